"""lmms-eval results -> the MLflow run that trained the checkpoint (through ``toolkit.tracking``, the only door).

``log_results(run, results)`` finds the run's MLflow run in its ``run.json`` (a staged recipe: the last stage's
run, the one whose weights were evaluated) and logs:

- metrics ``eval/<task>/<metric>`` (lmms-eval's ``"<metric>,<filter>"`` keys: the filter is appended only when
  it is not ``none``, e.g. ``eval/mme/mme_cognition_score``, ``eval/gqa/exact_match/strict``), numbers only;
- tags ``eval.harness`` (``lmms-eval``), ``eval.harness_version`` (the installed package's version, else the
  results' ``lmms_eval_version``), ``eval.tasks`` and one ``eval.<task>`` tag per task naming the harness and
  version that produced it, and ``eval.limit`` when the evaluation ran on a subset (a partial score);
- the whole results JSON as an artifact ``lmms_eval_<tasks>.json``.

``evaluate(run, tasks)`` runs lmms-eval on the run (``simple_evaluate`` with ``toolkit.eval.lmms.Chimera``)
and logs what it returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from toolkit.errors import ChimeraError

HARNESS = "lmms-eval"


def harness_version(results: Mapping[str, Any] | None = None) -> str:
    """The installed lmms-eval's version, else what the results say (``branch@sha``), else ``unknown``."""
    from importlib import metadata

    for name in ("lmms-eval", "lmms_eval"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return str((results or {}).get("lmms_eval_version") or "unknown")


def run_of(run: str | Path) -> tuple[str, str]:
    """(tracking URI, MLflow run id) of a run folder's final model, from its ``run.json``."""
    from toolkit.plan import RESOLVED_CONFIG, RUN_STATE

    folder = Path(run)
    state_file = folder / RUN_STATE
    if not state_file.is_file():
        raise ChimeraError(
            f"{run}: no {RUN_STATE}; pass the run folder that trained the checkpoint (runs/NAME)"
        )
    state = json.loads(state_file.read_text())
    uri, run_id = state.get("tracking_uri"), state.get("run_id")
    stages = state.get("stages") or {}
    if stages:  # a staged recipe: the last stage of the recipe holds the final model
        from toolkit.plan import load_plan

        last = load_plan(folder / RESOLVED_CONFIG, check_model=False).stages[-1].name
        run_id = (stages.get(last) or {}).get("run_id")
    if not uri or not run_id:
        raise ChimeraError(f"{state_file}: no MLflow run recorded for the final model (has it been trained?)")
    return str(uri), str(run_id)


def _metric_name(task: str, key: str) -> str:
    metric, _, filt = key.partition(",")
    name = f"eval/{task}/{metric}" + (f"/{filt}" if filt and filt != "none" else "")
    return re.sub(r"[^\w\-. :/]", "_", name)


def flat_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """lmms-eval's ``results`` (per task ``{"<metric>,<filter>": value, "alias": ...}``) -> MLflow metrics."""
    out = {}
    for task, values in (results.get("results") or {}).items():
        for key, value in (values or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # aliases, "N/A" stderr strings, nested details
            out[_metric_name(str(task), str(key))] = float(value)
    return out


def log_results(run: str | Path, results: Mapping[str, Any] | str | Path) -> str:
    """Log an lmms-eval results dict (or its JSON file) to the MLflow run of ``run``'s final weights; returns
    that run's id."""
    from toolkit import tracking

    if not isinstance(results, Mapping):
        path = Path(results)
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ChimeraError(f"{path}: not an lmms-eval results JSON ({exc})") from exc
    if not isinstance(results.get("results"), Mapping) or not results["results"]:
        raise ChimeraError(
            "lmms-eval results: no 'results' section (pass the *_results.json lmms-eval wrote)"
        )
    uri, run_id = run_of(run)
    tasks = sorted(str(t) for t in results["results"])
    version = harness_version(results)
    tracking.log_metrics(uri, run_id, flat_metrics(results))
    tags = {
        "eval.harness": HARNESS,
        "eval.harness_version": version,
        "eval.tasks": ",".join(tasks),
        **{f"eval.{task}": f"{HARNESS} {version}" for task in tasks},
    }
    limit = (results.get("config") or {}).get("limit")
    if limit is not None:
        tags["eval.limit"] = str(limit)
    tracking.set_tags(uri, run_id, tags)
    name = "lmms_eval_" + re.sub(r"[^\w\-.+]", "_", "+".join(tasks))[:120] + ".json"
    tracking.log_artifact_text(uri, run_id, json.dumps(results, indent=2, default=str), name)
    return run_id


def evaluate(
    run: str | Path,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    log: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """lmms-eval's ``simple_evaluate`` on ``run`` (``Chimera(run=...)``), its results logged to the MLflow run.

    Needs the ``eval`` extra (lmms-eval and its dependencies); the tasks' datasets come from the Hugging Face
    hub or its cache, as lmms-eval loads them.
    """
    try:
        from lmms_eval.evaluator import simple_evaluate
    except ImportError as exc:
        raise ChimeraError(
            f"lmms-eval is not installed ({exc}); pip install 'chimera-toolkit[eval]'"
        ) from exc
    from toolkit.eval.lmms import Chimera

    model = Chimera(run=str(run), batch_size=batch_size, device=device)
    results = simple_evaluate(model=model, tasks=list(tasks), limit=limit, batch_size=batch_size, **kwargs)
    if results is None:  # a non-zero rank of a distributed evaluation
        return {}
    if log:
        log_results(run, results)
    return results
