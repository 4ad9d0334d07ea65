"""``python -m toolkit.eval log RUN RESULTS.json``: log an lmms-eval results file to the run's MLflow run."""

from __future__ import annotations

import argparse
import sys

from toolkit.errors import ChimeraError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toolkit.eval", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("log", help="log an lmms-eval *_results.json to the MLflow run that trained RUN")
    p.add_argument("run", help="the run folder (runs/NAME)")
    p.add_argument("results", help="the results JSON lmms-eval wrote (--output_path)")
    args = ap.parse_args(argv)
    from toolkit.eval.results import log_results

    try:
        run_id = log_results(args.run, args.results)
    except ChimeraError as exc:
        print(f"chimera: error: {exc}", file=sys.stderr)
        return 2
    print(f"chimera: logged {args.results} to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
