"""``chimera train``: fit a plan's stages in order, each to its own MLflow run, resumable at any point.

For each stage: seed -> model and data (``toolkit.assemble``) -> strategy -> LightningModule -> logger and
checkpoints (``toolkit.trainer``) -> fit -> consolidated final weights. Around the stages, this module owns
the run's life: the lock (``toolkit.lock``), the preflight checks, ``run.json`` (``toolkit.plan.RunState``),
signals (``toolkit.signals``) and the MLflow run states.

Modes: ``train(plan)`` starts afresh (an earlier run folder of the same name is moved aside, never deleted);
``resume=True`` skips finished stages and continues an unfinished one from its newest loadable checkpoint, in
its MLflow run; ``stage=NAME`` runs that stage only, from the previous stage's final weights as recorded in
run.json, under the recipe's existing parent run. A MLflow run id is recorded as soon as MLflow has created
the run, before the first step, so a run killed at any point resumes into the same MLflow run. Stage N starts
from stage N-1's final weights.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ChimeraError, RunInterrupted
from toolkit.plan import RESOLVED_CONFIG, Plan, RunState, StagePlan, load_plan
from toolkit.ranks import barrier, is_global_zero


@dataclass
class StageResult:
    name: str
    run_id: str
    checkpoint: str | None  # the consolidated final weights
    metrics: dict[str, float] = field(default_factory=dict)
    global_step: int = 0


@dataclass
class TrainResult:
    tracking_uri: str
    experiment: str
    run_id: str  # the run (or, for a staged recipe, the parent run)
    run_dir: str
    stages: list[StageResult]


def train(
    plan: Plan | str | Path, overrides: Sequence[str] = (), *, stage: str | None = None, resume: bool = False
) -> TrainResult:
    """Train a plan (or an experiment file with overrides): all its stages in order, or one."""
    if not isinstance(plan, Plan):
        plan = load_plan(plan, overrides)
    if stage is not None:
        plan.stage(stage)  # an unknown stage fails before anything is touched
    zero = is_global_zero()
    if zero:
        preflight(plan)
    from toolkit.lock import RunLock
    from toolkit.signals import GracefulStop

    stop = GracefulStop()
    with RunLock(plan.run_dir) if zero else contextlib.nullcontext():
        stop.install()
        try:
            return _train(plan, stage, resume, zero, stop)
        finally:
            stop.uninstall()


def preflight(plan: Plan) -> None:
    """Fail in seconds, before a model is built or a run recorded: output folder and tracking store usable."""
    from toolkit import tracking

    out = Path(plan.cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".chimera-write-test-"):
            pass
    except OSError as exc:
        raise ChimeraError(
            f"output_dir: cannot write to {out} ({exc.strerror or exc}); set output_dir to a writable folder"
        ) from exc
    tracking.check_store(plan.tracking_uri)
    from toolkit.memory import preflight as check_memory

    check_memory(plan)  # a model that cannot fit fails now with the plan's numbers, not killed mid-build


def _set_aside(run_dir: Path) -> None:
    """A fresh run never deletes an earlier run's files: the old folder is renamed ``NAME.prev-TIMESTAMP``."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.prev-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.prev-{stamp}-{n}")
    run_dir.rename(target)
    print(
        f"chimera: {run_dir} held an earlier run; moved it to {target} "
        f"(to continue that run instead, use --resume)",
        file=sys.stderr,
    )


def _train(plan: Plan, only: str | None, resume: bool, zero: bool, stop: Any) -> TrainResult:
    from toolkit import tracking

    uri = plan.tracking_uri
    state = RunState(plan, writer=zero)
    if resume and not state.exists:
        print(f"chimera: --resume: no {state.path}; starting afresh", file=sys.stderr)
        resume = False
    if not resume and only is None:  # a fresh run
        if zero:
            _set_aside(plan.run_dir)
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            from toolkit.config import to_yaml
            from toolkit.strategies import atomic_write_bytes

            atomic_write_bytes(str(plan.run_dir / RESOLVED_CONFIG), to_yaml(plan.cfg).encode())
        state.reset()
    first = next(s.index for s in plan.stages if s.name == only) if only else 0
    if first > 0 and _finished_weights(state.record(plan.stages[first - 1]), plan.stages[first - 1]) is None:
        raise _not_finished(plan, plan.stages[first])

    parent = state.data.get("parent_run_id") if plan.staged else None
    if parent and zero and not tracking.run_exists(uri, parent):
        raise _lost_run(plan, state, parent)
    if plan.staged and parent is None and zero:
        parent = tracking.start_parent_run(plan.cfg, run_name=_run_name(plan), tags=plan.tags)
        state.data["parent_run_id"] = parent
    done = {s.name: bool(state.record(s).get("finished")) for s in plan.stages}  # before the flag is reset
    state.data["finished"] = False
    state.save()

    results: list[StageResult] = []
    previous: str | None = None
    try:
        for stage in plan.stages:
            record = state.record(stage)
            if only is not None and stage.name != only:
                if stage.index > first:
                    break
                previous = _finished_weights(record, stage)  # an earlier stage: its weights feed the next
                continue
            if resume and done[stage.name] and plan.staged:  # a finished stage of a recipe is skipped; a
                previous = _finished_weights(record, stage)  # one-stage run resumes (to a new max_steps)
                continue
            if stage.index > 0 and previous is None:
                raise _not_finished(plan, stage)
            continuing = resume and record.get("run_id") is not None
            if continuing and zero and not tracking.run_exists(uri, record["run_id"]):
                raise _lost_run(plan, state, record["run_id"])
            if not continuing and plan.staged:
                record.clear()
                for later in plan.stages[stage.index + 1 :]:  # trained from this stage's old weights
                    state.record(later).clear()

            def remember(run_id: str, record: dict[str, Any] = record) -> None:
                record.update(run_id=run_id, finished=False)
                state.save()

            tags = dict(plan.tags)
            if plan.staged:
                tags.update(
                    {
                        "mlflow.parentRunId": parent or "",
                        "chimera.stage": stage.name,
                        "chimera.stage_index": str(stage.index + 1),
                    }
                )
            result = fit_stage(
                plan,
                stage,
                tags=tags,
                run_id=record.get("run_id") if continuing else None,
                init_from=previous,
                resume=continuing,
                on_run_id=remember,
                stop=stop,
            )
            previous = result.checkpoint
            results.append(result)
            record.update(finished=True, weights=result.checkpoint)
            state.save()
            if zero and parent:
                summary = {
                    f"{stage.name}/{k}": v
                    for k, v in result.metrics.items()
                    if k.startswith(("train/loss", "val/"))
                }
                tracking.log_metrics(uri, parent, summary, step=stage.index + 1)
    except BaseException as exc:
        if zero and parent:
            tracking.end_run(uri, parent, "KILLED" if isinstance(exc, RunInterrupted) else "FAILED")
        raise
    if all(state.record(s).get("finished") for s in plan.stages):
        state.data["finished"] = True
        state.save()
        if zero and parent:
            tracking.end_run(uri, parent)
    run_id = parent if plan.staged else state.data.get("run_id", "")
    return TrainResult(uri, plan.experiment, (run_id or "") if zero else "", str(plan.run_dir), results)


def _run_name(plan: Plan) -> str:
    return str(plan.cfg.tracking.get("run_name") or plan.name)


def _not_finished(plan: Plan, stage: StagePlan) -> ChimeraError:
    before = plan.stages[stage.index - 1].name
    return ChimeraError(
        f"{plan.config_path}: stage '{stage.name}' starts from stage '{before}', which has not finished; "
        f"run it first ({plan.command('--stage', before)})"
    )


def _lost_run(plan: Plan, state: RunState, run_id: str) -> ChimeraError:
    return ChimeraError(
        f"{state.path}: names MLflow run {run_id}, which the store {plan.tracking_uri} does not hold (another "
        "store, or a deleted run); point tracking.uri at the store that holds it, or start afresh without "
        "--resume (the folder is moved aside)"
    )


def _finished_weights(record: dict[str, Any], stage: StagePlan) -> str | None:
    """A finished stage's consolidated weights (or, failing that, its newest loadable checkpoint)."""
    from toolkit.checkpointing import final_weights, loadable_checkpoint

    if not record.get("finished"):
        return None
    weights = record.get("weights")
    if weights and Path(weights).is_file():
        return str(weights)
    return final_weights(stage.run_dir) or loadable_checkpoint(stage.run_dir / "checkpoints")[0]


@contextlib.contextmanager
def _restore_tracking_env() -> Iterator[None]:
    """Lightning's MLFlowLogger calls ``mlflow.set_tracking_uri``, which (MLflow 3) also sets
    ``$MLFLOW_TRACKING_URI``; the next plan of this process (and its subprocesses) would then log to this run's
    store. Put the variable back as it was."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _resume_checkpoint(ckpt_dir: Path, zero: bool) -> str | None:
    """The newest checkpoint that loads; damaged ones are skipped with the reason, stale temporaries removed."""
    from toolkit.checkpointing import clean_stale_temporaries, loadable_checkpoint

    if zero:
        clean_stale_temporaries(ckpt_dir)
    path, skipped = loadable_checkpoint(ckpt_dir)
    if zero:
        for bad, reason in skipped:
            print(f"chimera: skipped {bad}: {reason}", file=sys.stderr)
        if path is None:
            print(
                f"chimera: no loadable checkpoint under {ckpt_dir}; starting this stage from its beginning",
                file=sys.stderr,
            )
        else:
            print(f"chimera: resuming from {path}", file=sys.stderr)
    return path


def _clear_stage_outputs(run_dir: Path) -> None:
    """Re-running one stage of a recipe (``--stage``) replaces that stage's own checkpoints and weights."""
    import shutil

    from toolkit.checkpointing import FINAL_WEIGHTS, LEGACY_FINAL_WEIGHTS

    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        print(f"chimera: re-running this stage: removing its old checkpoints in {ckpt_dir}", file=sys.stderr)
        shutil.rmtree(ckpt_dir)
    for name in (FINAL_WEIGHTS, LEGACY_FINAL_WEIGHTS):
        (run_dir / name).unlink(missing_ok=True)


def fit_stage(
    plan: Plan,
    stage: StagePlan,
    *,
    tags: dict[str, str],
    run_id: str | None = None,
    init_from: str | None = None,
    resume: bool = False,
    on_run_id: Callable[[str], None] | None = None,
    stop: Any = None,
) -> StageResult:
    """Train one stage and log it to one MLflow run; ends with ``{stage.run_dir}/final.safetensors`` (the
    consolidated weights; all ranks wait for them).

    ``run_id``: an MLflow run to continue; ``init_from``: weights to start from (the previous stage's);
    ``resume``: continue from the stage's newest checkpoint; ``on_run_id``: called on rank 0 as soon as the
    MLflow run exists; ``stop``: a ``GracefulStop`` (signals end the stage after a checkpoint).
    """
    with _restore_tracking_env():
        return _fit_stage(plan, stage, tags, run_id, init_from, resume, on_run_id, stop)


def _fit_stage(plan, stage, tags, run_id, init_from, resume, on_run_id, stop) -> StageResult:
    import lightning.pytorch as pl
    import torch
    from omegaconf import OmegaConf

    from toolkit import tracking
    from toolkit.assemble import build_parts
    from toolkit.checkpointing import FINAL_WEIGHTS, export_weights, load_weights
    from toolkit.module import ChimeraModule
    from toolkit.strategies import (
        apply_activation_checkpointing,
        check_memory_policy,
        keep_frozen,
        make_strategy,
    )
    from toolkit.trainer import make_trainer

    cfg, zero = stage.cfg, is_global_zero()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    policy = check_memory_policy(cfg.strategy)
    meta = policy["init"] == "meta"
    model, datamodule = build_parts(cfg, plan.tokenizer, init=policy["init"])
    strategy, shard = make_strategy(cfg.strategy, cfg.trainer, seed=int(cfg.seed), init_from=init_from)
    if meta and shard is None:  # nothing shards it: every rank materialises the whole model here
        from toolkit.init import materialize

        materialize(model, "cpu", seed=int(cfg.seed))
    if init_from is not None and not (meta and shard is not None):  # else the sharder loads the shards
        load_weights(model, init_from)
    if policy["activation_checkpointing"]:
        apply_activation_checkpointing(model, policy["activation_checkpointing"])
    config = OmegaConf.to_container(cfg, resolve=True)
    module = ChimeraModule(
        model, optim=config["optim"], max_steps=int(cfg.trainer.max_steps), shard=shard, config=config
    )
    keep_frozen(model, policy["frozen_dtype"])  # once the trainable set is final
    ckpt_path = None
    if resume:
        ckpt_path = _resume_checkpoint(stage.run_dir / "checkpoints", zero)
    elif zero and plan.staged:
        _clear_stage_outputs(stage.run_dir)
    # Only rank 0 talks to MLflow: other ranks must not even open the store (concurrent sqlite migrations
    # fail when torchrun starts every rank at once).
    run_name = f"{_run_name(plan)}/{stage.name}" if plan.staged else _run_name(plan)
    logger = tracking.make_logger(cfg, run_name=run_name, tags=tags, run_id=run_id) if zero else False
    trainer = make_trainer(
        cfg, stage.run_dir, strategy=strategy, logger=logger, callbacks=[stop] if stop else []
    )
    if logger:
        run_id = logger.run_id  # creates the MLflow run now, before any step
        if on_run_id is not None:
            on_run_id(run_id)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tracking.log_params(
            plan.tracking_uri, run_id, tracking.flat_params(cfg, {"trainable_params": trainable})
        )
        tracking.log_artifact_text(
            plan.tracking_uri, run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml"
        )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    if stop is not None and stop.signum:
        import signal

        if logger:
            tracking.end_run(plan.tracking_uri, logger.run_id, "KILLED")
        name = signal.Signals(stop.signum).name
        raise RunInterrupted(
            stop.signum,
            f"stopped by {name} at step {trainer.global_step}; checkpoint in {stage.run_dir / 'checkpoints'}; "
            f"continue with: {plan.command('--resume')}",
        )
    final = stage.run_dir / FINAL_WEIGHTS
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
    barrier()
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    return StageResult(
        name=stage.name,
        run_id=logger.run_id if logger else "",
        checkpoint=str(final),
        metrics=metrics,
        global_step=int(trainer.global_step),
    )
