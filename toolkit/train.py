"""``chimera train``: one experiment (or each stage of a recipe) from config to an MLflow run.

Everything a run needs is derived here from the resolved config, in the same order for every experiment:
seed -> tokenizer -> model -> data -> strategy -> LightningModule -> logger and checkpoints -> fit -> export.

A run directory ``{output_dir}/{name}`` holds the resolved config, ``run.json`` and, per run (or per stage,
under ``stage{i}_{name}/``), ``checkpoints/`` and ``final.pt`` (the consolidated weights, written at the end).
``run.json`` is the bookkeeping ``--resume`` reads; it is rewritten atomically at every transition::

    {"tracking_uri": ..., "run_id": ..., "finished": false}                      # an experiment
    {"tracking_uri": ..., "parent_run_id": ..., "finished": false,               # a staged recipe
     "stages": {"align": {"run_id": ..., "finished": true, "weights": ".../final.pt"},
                "instruct": {"run_id": ..., "finished": false}}}

A run id is recorded as soon as MLflow has created the run, before the first step, so a run killed at any
point resumes into the same MLflow run. A staged recipe logs to one parent run with a child run per stage
(tag ``mlflow.parentRunId``); stage N starts from stage N-1's ``final.pt``.

Modes: ``train(cfg)`` starts afresh (a new run; the run directory's old checkpoints are removed);
``resume=True`` skips finished stages and continues an unfinished one from its last checkpoint, in its MLflow
run; ``stage=NAME`` runs that stage only, from the previous stage's final weights as recorded in run.json,
under the recipe's existing parent run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ChimeraError

FINAL_WEIGHTS = "final.pt"


@dataclass
class StageResult:
    name: str
    run_id: str
    checkpoint: str | None  # the consolidated final weights (final.pt)
    metrics: dict[str, float] = field(default_factory=dict)
    global_step: int = 0


@dataclass
class TrainResult:
    tracking_uri: str
    experiment: str
    run_id: str  # the run (or, for a staged recipe, the parent run)
    run_dir: str
    stages: list[StageResult]


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, so a kill never leaves a half-written file."""
    from toolkit.strategies import atomic_write_bytes

    atomic_write_bytes(str(path), text.encode())


def is_global_zero() -> bool:
    """Whether this process is global rank 0, from the launcher's environment (before any Trainer exists).

    torchrun and SLURM set ``RANK`` / ``SLURM_PROCID``; Lightning's own launcher sets ``NODE_RANK`` and
    ``LOCAL_RANK`` for the processes it starts (its first process has neither until it launches the others).
    """
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var) is not None and (
            var != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        ):
            return int(os.environ[var]) == 0
    return (
        int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))) == 0
        and int(os.environ.get("LOCAL_RANK", "0")) == 0
    )


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def build_tokenizer(cfg: Any):
    """The configured tokenizer, or a word-level one over every dataset of the experiment and its stages
    (one vocabulary for all stages, so weights carry over)."""
    from toolkit.config import stage_config
    from toolkit.data import dataset_vocabulary, load_tokenizer

    words: list[str] = []
    if cfg.data.get("tokenizer") is None:
        sources = [("", cfg)] + [
            (f"stages[{i}].", stage_config(cfg, s)) for i, s in enumerate(cfg.get("stages") or [])
        ]
        for prefix, c in sources:
            for split in ("train", "val"):
                node = c.data.get(split)
                if node is not None:
                    words += dataset_vocabulary(node, f"{prefix}data.{split}")
    return load_tokenizer(cfg.data.get("tokenizer"), words)


def build_parts(cfg: Any, tokenizer: Any):
    """(model, datamodule) for a resolved config."""
    from omegaconf import OmegaConf

    from toolkit.data import ChimeraDataModule, image_token_id
    from toolkit.model import build_model

    model = build_model(
        OmegaConf.to_container(cfg.model, resolve=True),
        vocab_size=len(tokenizer),
        image_token_id=image_token_id(tokenizer),
    )
    data = cfg.data
    datamodule = ChimeraDataModule(
        OmegaConf.to_container(data.train, resolve=True),
        OmegaConf.to_container(data.val, resolve=True) if data.get("val") is not None else None,
        tokenizer=tokenizer,
        image_tokens=model.image_tokens,
        image_size=model.encoder.image_size,
        batch_size=int(data.batch_size),
        val_batch_size=data.get("val_batch_size"),
        num_workers=int(data.num_workers),
        max_length=int(data.max_length),
        seed=int(cfg.seed),
    )
    return model, datamodule


def _trainer_kwargs(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.trainer, resolve=True)


def _final_checkpoint_callback(**kwargs: Any):
    """ModelCheckpoint that also writes ``last.ckpt`` at the final step (Lightning's saves only on its
    every-n-steps schedule), so the last checkpoint always holds the final weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class FinalModelCheckpoint(ModelCheckpoint):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if (
                self.save_last
                and self._last_global_step_saved != trainer.global_step
                and trainer.global_step > 0
            ):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    return FinalModelCheckpoint(**kwargs)


@contextlib.contextmanager
def _restore_tracking_env():
    """Lightning's MLFlowLogger calls ``mlflow.set_tracking_uri``, which (MLflow 3) also sets
    ``$MLFLOW_TRACKING_URI``; ``toolkit.tracking.tracking_uri`` would then send every later run of this process
    (and its subprocesses) to this run's store. Put the variable back as it was."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _clear_run_outputs(run_dir: Path) -> None:
    """A fresh run replaces the checkpoints and final weights an earlier run of the same name left."""
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        print(f"chimera: fresh run: removing old checkpoints in {ckpt_dir}", file=sys.stderr)
        shutil.rmtree(ckpt_dir)
    (run_dir / FINAL_WEIGHTS).unlink(missing_ok=True)


def _fit_one(
    cfg: Any,
    *,
    run_dir: Path,
    tokenizer: Any,
    run_name: str,
    tags: dict[str, str],
    run_id: str | None = None,
    init_from: str | None = None,
    resume: bool = False,
    on_run_id: Callable[[str], None] | None = None,
) -> StageResult:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor
    from omegaconf import OmegaConf

    from toolkit import tracking
    from toolkit.checkpointing import export_weights, latest_checkpoint, load_weights
    from toolkit.module import ChimeraModule
    from toolkit.strategies import AtomicCheckpointIO, apply_activation_checkpointing, make_strategy

    zero = is_global_zero()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model, datamodule = build_parts(cfg, tokenizer)
    if init_from is not None:
        load_weights(model, init_from)
    strategy, shard = make_strategy(cfg.strategy, cfg.trainer)
    if cfg.strategy.get("activation_checkpointing"):
        apply_activation_checkpointing(model)
    config = OmegaConf.to_container(cfg, resolve=True)
    module = ChimeraModule(
        model, optim=config["optim"], max_steps=int(cfg.trainer.max_steps), shard=shard, config=config
    )
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = None
    if resume:
        ckpt_path = latest_checkpoint(ckpt_dir)
        if ckpt_path is None:
            print(
                f"chimera: no checkpoint under {ckpt_dir}; starting this run from its beginning",
                file=sys.stderr,
            )
        elif zero:
            print(f"chimera: resuming from {ckpt_path}", file=sys.stderr)
    elif zero:
        _clear_run_outputs(run_dir)
    # Only rank 0 talks to MLflow: other ranks must not even open the store (concurrent sqlite migrations
    # fail when torchrun starts every rank at once).
    logger = tracking.make_logger(cfg, run_name=run_name, tags=tags, run_id=run_id) if zero else False
    uri = tracking.tracking_uri(cfg)
    checkpoint = _final_checkpoint_callback(
        dirpath=str(ckpt_dir),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=int(cfg.checkpoint.every_n_steps),
        save_top_k=int(cfg.checkpoint.keep),
        monitor="step",
        mode="max",
        save_last=bool(cfg.checkpoint.save_last),
        enable_version_counter=False,  # overwrite last.ckpt, never write last-v1.ckpt
    )
    trainer = pl.Trainer(
        **_trainer_kwargs(cfg),
        strategy=strategy,
        logger=logger,
        callbacks=[checkpoint, *([LearningRateMonitor(logging_interval="step")] if logger else [])],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the datamodule shards its own seeded sampler
        default_root_dir=str(run_dir),
    )
    if logger:
        run_id = logger.run_id  # creates the MLflow run now, before any step
        if on_run_id is not None:
            on_run_id(run_id)
        tracking.log_params(
            uri,
            run_id,
            tracking.flat_params(
                cfg, {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            ),
        )
        tracking.log_artifact_text(uri, run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    final = run_dir / FINAL_WEIGHTS
    if shard is not None:  # FSDP: gather the full weights on rank 0 (a collective: every rank calls it)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(
            module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    else:
        weights = module.model.state_dict()
    if trainer.is_global_zero:
        export_weights(weights, final)
    del weights
    _barrier()
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    return StageResult(
        name=run_name,
        run_id=logger.run_id if logger else "",
        checkpoint=str(final),
        metrics=metrics,
        global_step=int(trainer.global_step),
    )


def fit_one(cfg: Any, **kwargs: Any) -> StageResult:
    """Train one config (an experiment without stages, or one stage) and log it to one MLflow run.

    Keyword arguments: ``run_dir``, ``tokenizer``, ``run_name``, ``tags``; ``run_id`` (an MLflow run to
    continue), ``init_from`` (weights to start from, e.g. the previous stage's), ``resume`` (continue from the
    last complete checkpoint under ``run_dir/checkpoints``) and ``on_run_id`` (called on rank 0 as soon as
    the MLflow run exists). Ends with ``run_dir/final.pt``, the consolidated weights (all ranks wait for it).
    """
    with _restore_tracking_env():
        return _fit_one(cfg, **kwargs)


class RunState:
    """``run.json``: read by every rank, written (atomically) by rank 0 only."""

    def __init__(self, path: Path, uri: str, writer: bool) -> None:
        self.path, self.writer = path, writer
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.data["tracking_uri"] = uri

    def save(self) -> None:
        if self.writer:
            atomic_write_text(self.path, json.dumps(self.data, indent=2))

    def stage(self, name: str) -> dict[str, Any]:
        return self.data.setdefault("stages", {}).setdefault(name, {})


def _check_stage_configs(cfg: Any, config_path: str | Path) -> list[Any]:
    """Each stage's config, every component node validated before the first stage trains."""
    from toolkit.config import Sources, check_components, stage_config

    configs = []
    for i, node in enumerate(cfg.stages):
        scfg = stage_config(cfg, node)
        try:
            check_components(scfg, Sources(str(config_path)))
        except ChimeraError as exc:
            raise ChimeraError(f"stages[{i}] ({node['name']}): {exc}", key=exc.key) from exc
        configs.append(scfg)
    return configs


def train(
    config_path: str | Path, overrides: Sequence[str] = (), *, stage: str | None = None, resume: bool = False
) -> TrainResult:
    """Train an experiment: all its stages in order (stage N starts from stage N-1's weights), or one."""
    from toolkit import tracking
    from toolkit.config import load_config, to_yaml

    cfg = load_config(config_path, overrides)
    zero = is_global_zero()
    run_dir = Path(cfg.output_dir).resolve() / str(cfg.name)  # absolute: run.json stays valid from any cwd
    run_dir.mkdir(parents=True, exist_ok=True)
    if zero:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    uri = tracking.tracking_uri(cfg)
    state = RunState(run_dir / "run.json", uri, writer=zero)
    tags = tracking.run_tags(cfg, config_path, list(overrides))
    stages = list(cfg.get("stages") or [])
    if resume and not state.path.is_file():
        print(f"chimera: --resume: no {state.path}; starting afresh", file=sys.stderr)

    if not stages:
        if stage is not None:
            raise ChimeraError(f"{config_path}: --stage {stage}: this experiment has no stages")
        if not resume:
            state.data = {"tracking_uri": uri}
        tokenizer = build_tokenizer(cfg)

        def record(run_id: str) -> None:
            state.data.update(run_id=run_id, finished=False)
            state.save()

        result = fit_one(
            cfg,
            run_dir=run_dir,
            tokenizer=tokenizer,
            run_name=str(cfg.name),
            tags=tags,
            run_id=state.data.get("run_id") if resume else None,
            resume=resume,
            on_run_id=record,
        )
        state.data["finished"] = True
        state.save()
        return TrainResult(uri, str(cfg.tracking.experiment), result.run_id, str(run_dir), [result])

    names = [str(s["name"]) for s in stages]
    if stage is not None and stage not in names:
        raise ChimeraError(f"{config_path}: --stage {stage}: no such stage; stages: {', '.join(names)}")
    stage_cfgs = _check_stage_configs(cfg, config_path)
    tokenizer = build_tokenizer(cfg)
    if not resume and stage is None:
        state.data = {"tracking_uri": uri}  # a fresh recipe: new parent run, every stage from scratch
    first = names.index(stage) if stage is not None else 0
    if (
        first > 0
        and _finished_weights(state.stage(names[first - 1]), run_dir / f"stage{first}_{names[first - 1]}")
        is None
    ):
        raise ChimeraError(
            f"{config_path}: stage '{stage}' starts from stage '{names[first - 1]}', which has not finished; "
            f"run it first (chimera train {config_path} --stage {names[first - 1]})"
        )
    parent = state.data.get("parent_run_id")
    if parent is None and zero:
        parent = tracking.start_parent_run(cfg, run_name=str(cfg.name), tags=tags)
        state.data["parent_run_id"] = parent
    state.data["finished"] = False
    state.save()

    results: list[StageResult] = []
    previous: str | None = None
    for i, (name, scfg) in enumerate(zip(names, stage_cfgs)):
        stage_dir = run_dir / f"stage{i + 1}_{name}"
        record = state.stage(name)
        if stage is not None and name != stage:
            if names.index(stage) < i:
                break
            previous = _finished_weights(record, stage_dir)  # an earlier stage: its weights feed the next
            continue
        if resume and record.get("finished"):
            previous = _finished_weights(record, stage_dir)
            continue
        if i > 0 and previous is None:
            raise ChimeraError(
                f"{config_path}: stage '{name}' starts from stage '{names[i - 1]}', which has not finished; "
                f"run it first (chimera train {config_path} --stage {names[i - 1]})"
            )
        continuing = resume and record.get("run_id") is not None
        if not continuing:
            record.clear()
            for later in names[i + 1 :]:  # trained from this stage's old weights: no longer valid
                state.stage(later).clear()

        def remember(run_id: str, record: dict[str, Any] = record) -> None:
            record.update(run_id=run_id, finished=False)
            state.save()

        stage_tags = {
            **tags,
            "mlflow.parentRunId": parent or "",
            "chimera.stage": name,
            "chimera.stage_index": str(i + 1),
        }
        result = fit_one(
            scfg,
            run_dir=stage_dir,
            tokenizer=tokenizer,
            run_name=f"{cfg.name}/{name}",
            tags=stage_tags,
            run_id=record.get("run_id") if continuing else None,
            init_from=previous,
            resume=continuing,
            on_run_id=remember,
        )
        result.name = name
        previous = result.checkpoint
        results.append(result)
        record.update(finished=True, weights=result.checkpoint)
        state.save()
        if zero and parent:
            summary = {
                f"{name}/{k}": v for k, v in result.metrics.items() if k.startswith(("train/loss", "val/"))
            }
            tracking.log_metrics(uri, parent, summary, step=i + 1)
    if all(state.stage(n).get("finished") for n in names):
        state.data["finished"] = True
        state.save()
        if zero and parent:
            tracking.end_run(uri, parent)
    return TrainResult(uri, str(cfg.tracking.experiment), parent or "", str(run_dir), results)


def _finished_weights(record: dict[str, Any], stage_dir: Path) -> str | None:
    """A finished stage's consolidated weights (or, failing that, its last checkpoint)."""
    from toolkit.checkpointing import latest_checkpoint

    if not record.get("finished"):
        return None
    weights = record.get("weights")
    if weights and Path(weights).is_file():
        return str(weights)
    if (stage_dir / FINAL_WEIGHTS).is_file():
        return str(stage_dir / FINAL_WEIGHTS)
    return latest_checkpoint(stage_dir / "checkpoints")
