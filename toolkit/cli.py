"""``chimera``: train, describe, components, bench.

User errors (``ChimeraError``) print one line and exit 2; ``--debug`` shows the traceback. Anything else is a
bug and keeps its traceback. Heavy imports happen inside the commands, so ``chimera --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from toolkit.errors import ChimeraError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist), e.g. optim.lr=3e-4")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="chimera", description="Compose and train LLaVA-style models from plugins."
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an experiment (all stages, or one with --stage)")
    _add_config_args(p)
    p.add_argument("--stage", help="run only this stage of a staged recipe")
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint and the same MLflow run"
    )

    p = sub.add_parser("describe", help="build the model on the meta device and print its structure")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("components", help="list registered components with their parameters")
    p.add_argument("kind", nargs="?", help="encoder, pooler, connector, mixer, ffn, decoder or dataset")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="benchmarks to run on your own hardware")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser(
        "mixers", help="Mamba-1/Mamba-2 CPU paths vs references; hybrid vs Transformer prefill"
    )
    b.add_argument("--json", action="store_true")
    b.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not the issue's figures)")
    b = bsub.add_parser(
        "model", help="the toolkit's Lightning step vs a plain PyTorch loop on the same model"
    )
    _add_config_args(b)
    b.add_argument("--json", action="store_true")
    b.add_argument("--steps", type=int, default=20)
    return ap


def cmd_train(args: argparse.Namespace) -> int:
    from toolkit.train import train

    result = train(args.config, args.overrides, stage=args.stage, resume=args.resume)
    if not result.run_id:  # a non-zero rank of a multi-process run: rank 0 reports
        return 0
    print()
    for stage in result.stages:
        metrics = ", ".join(
            f"{k}={v:.4f}" for k, v in sorted(stage.metrics.items()) if k.startswith(("val/", "train/loss"))
        )
        print(f"chimera: {stage.name}: run {stage.run_id}  {metrics}")
        if stage.checkpoint:
            print(f"chimera:   checkpoint {stage.checkpoint}")
    print(f"chimera: MLflow run id {result.run_id} (experiment '{result.experiment}')")
    print(f"chimera: tracking store {result.tracking_uri}")
    print(f"chimera: look with: mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from toolkit.describe import describe, format_description

    info = describe(args.config, args.overrides)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def _param_repr(value: Any) -> Any:
    import inspect

    return None if value is inspect.Parameter.empty else value


def cmd_components(args: argparse.Namespace) -> int:
    from toolkit import registry

    entries = registry.entries(args.kind)
    if args.json:
        out = [
            {
                "kind": e.kind,
                "name": e.name,
                "symbol": e.symbol,
                "module": e.module,
                "summary": e.summary,
                "params": [
                    {
                        "name": p.name,
                        "default": _jsonable(_param_repr(p.default)),
                        "required": p.required and p.name not in registry.DERIVED[e.kind],
                        "derived": p.name in registry.DERIVED[e.kind],
                        "type": p.annotation,
                    }
                    for p in e.params()
                ],
            }
            for e in entries
        ]
        print(json.dumps(out, indent=2))
        return 0
    kind = None
    for e in entries:
        if e.kind != kind:
            kind = e.kind
            print(f"\n{kind}s:")
        letter = f" [{e.symbol}]" if e.symbol else ""
        print(f"  {e.name}{letter}  ({e.module})  {e.summary}")
        for p in e.params():
            if p.name in registry.DERIVED[e.kind]:
                default = "(derived by Chimera)"
            else:
                default = "required" if p.required else f"= {p.default!r}"
            print(f"      {p.name}: {p.annotation or 'Any'} {default}")
    return 0


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def cmd_bench(args: argparse.Namespace) -> int:
    command = (
        "chimera " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "chimera bench " + args.bench
    )
    if args.bench == "mixers":
        from toolkit.bench import bench_mixers, format_mixers

        result = bench_mixers(quick=args.quick)
    else:
        from toolkit.bench import bench_model, format_model

        result = bench_model(args.config, args.overrides, steps=args.steps)
    result["command"] = command
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print((format_mixers if args.bench == "mixers" else format_model)(result))
        print(f"\n(measured by: {command})")
    return 0


COMMANDS = {"train": cmd_train, "describe": cmd_describe, "components": cmd_components, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ChimeraError as exc:
        if args.debug:
            raise
        print(f"chimera: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
