"""MLflow: the only module that talks to it. Store URI, curated params, config artifact, tags, run lookup.

MLflow 3's file store raises, so the default is an explicit embedded sqlite store under ``output_dir``
(``sqlite:///<abs>/mlflow.db``); ``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` point elsewhere. Params are
immutable and truncated at 250 characters, so a run logs a short flat param set (dotted keys) and uploads
the full resolved YAML as ``config.yaml``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PARAM_KEYS = (
    "seed",
    "model.encoder.name",
    "model.encoder.model_name",
    "model.encoder.select_layer",
    "model.pooler.name",
    "model.pooler.stride",
    "model.connector.name",
    "model.connector.depth",
    "model.decoder.name",
    "model.decoder.d_model",
    "model.decoder.n_layers",
    "model.decoder.pattern",
    "model.decoder.ssm",
    "model.pool_after_connector",
    "data.train.name",
    "data.batch_size",
    "data.max_length",
    "optim.lr",
    "optim.weight_decay",
    "optim.warmup_steps",
    "optim.trainable",
    "trainer.max_steps",
    "trainer.accumulate_grad_batches",
    "trainer.precision",
    "trainer.devices",
    "trainer.num_nodes",
    "strategy.name",
    "strategy.activation_checkpointing",
)


def tracking_uri(cfg: Any) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store in ``output_dir``."""
    uri = cfg.tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    root = Path(cfg.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _select(cfg: Any, dotted: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, dotted, default=None)


def flat_params(cfg: Any, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The curated param set: what differs between runs of an ablation, as short strings."""
    params = {}
    for key in PARAM_KEYS:
        value = _select(cfg, key)
        if value is not None:
            params[key] = str(value)[:250]
    for key, value in (extra or {}).items():
        params[key] = str(value)[:250]
    return params


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(cfg: Any, config_path: str | Path | None, overrides: list[str] | None = None) -> dict[str, str]:
    tags = {"chimera.name": str(cfg.name)}
    if config_path is not None:
        tags["chimera.experiment_file"] = str(config_path)
    if overrides:
        tags["chimera.overrides"] = " ".join(overrides)[:5000]
    commit = git_commit(Path(config_path).parent if config_path else None)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags.update({str(k): str(v) for k, v in (cfg.tracking.get("tags") or {}).items()})
    return tags


def make_logger(cfg: Any, *, run_name: str, tags: Mapping[str, str], run_id: str | None = None):
    """Lightning's MLFlowLogger with an explicit URI (its defaults crash on MLflow 3)."""
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(
        experiment_name=str(cfg.tracking.experiment),
        run_name=run_name,
        tracking_uri=tracking_uri(cfg),
        tags=dict(tags),
        run_id=run_id,
        log_model=False,
    )


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_parent_run(cfg: Any, *, run_name: str, tags: Mapping[str, str]) -> str:
    """A parent run for a staged recipe; each stage logs to a child run under it."""
    c = client(tracking_uri(cfg))
    experiment = c.get_experiment_by_name(str(cfg.tracking.experiment))
    experiment_id = (
        experiment.experiment_id if experiment else c.create_experiment(str(cfg.tracking.experiment))
    )
    return c.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id


def log_params(uri: str, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    c = client(uri)
    existing = c.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]  # params are immutable on resume
    if new:
        c.log_batch(run_id, params=new)


def log_artifact_text(uri: str, run_id: str, text: str, name: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        client(uri).log_artifact(run_id, str(path))


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    c = client(uri)
    for key, value in metrics.items():
        c.log_metric(run_id, key, float(value), step=step)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def best_metric(uri: str, run_id: str, key: str, mode: str = "max") -> float | None:
    """Best value over a metric's history (``search_runs`` only returns the last value)."""
    history = client(uri).get_metric_history(run_id, key)
    if not history:
        return None
    values = [m.value for m in history]
    return max(values) if mode == "max" else min(values)
