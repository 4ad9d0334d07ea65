"""``chimera train``: one experiment (or each stage of a recipe) from config to an MLflow run.

Everything a run needs is derived here from the resolved config, in the same order for every experiment:
seed -> tokenizer -> model -> data -> strategy -> LightningModule -> logger and checkpoints -> fit. A run
directory ``{output_dir}/{name}`` holds the resolved config, ``run.json`` (the MLflow run ids, for
``--resume``) and the checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ChimeraError


@dataclass
class StageResult:
    name: str
    run_id: str
    checkpoint: str | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    tracking_uri: str
    experiment: str
    run_id: str  # the run (or, for a staged recipe, the parent run)
    run_dir: str
    stages: list[StageResult]


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, so a kill never leaves a half-written file."""
    import fsspec

    fs, _, (root,) = fsspec.get_fs_token_paths(str(path))
    with fs.transaction, fs.open(root, "w") as f:
        f.write(text)


def build_tokenizer(cfg: Any):
    from toolkit.data import dataset_vocabulary, load_tokenizer

    words: list[str] = []
    if cfg.data.get("tokenizer") is None:
        for split in ("train", "val"):
            node = cfg.data.get(split)
            if node is not None:
                words += dataset_vocabulary(node)
        for stage in cfg.get("stages") or []:
            for split in ("train", "val"):
                node = (stage.get("data") or {}).get(split)
                if node is not None:
                    words += dataset_vocabulary(node)
    return load_tokenizer(cfg.data.get("tokenizer"), words)


def build_parts(cfg: Any, tokenizer: Any):
    """(model, datamodule) for a resolved config."""
    from omegaconf import OmegaConf

    from toolkit.data import ChimeraDataModule, image_token_id
    from toolkit.model import build_model

    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), vocab_size=len(tokenizer), image_token_id=image_token_id(tokenizer))
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


def fit_one(
    cfg: Any,
    *,
    run_dir: Path,
    tokenizer: Any,
    run_name: str,
    tags: dict[str, str],
    run_id: str | None = None,
    init_from: str | None = None,
    resume: bool = False,
) -> StageResult:
    """Train one config (an experiment without stages, or one stage) and log it to one MLflow run."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from omegaconf import OmegaConf

    from toolkit import tracking
    from toolkit.checkpointing import latest_checkpoint, load_weights
    from toolkit.module import ChimeraModule
    from toolkit.strategies import apply_activation_checkpointing, make_strategy

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model, datamodule = build_parts(cfg, tokenizer)
    if init_from is not None:
        load_weights(model, init_from)
    strategy, shard = make_strategy(cfg.strategy, cfg.trainer)
    if cfg.strategy.get("activation_checkpointing"):
        apply_activation_checkpointing(model)
    config = OmegaConf.to_container(cfg, resolve=True)
    module = ChimeraModule(model, optim=config["optim"], max_steps=int(cfg.trainer.max_steps), shard=shard, config=config)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = None
    if resume:
        ckpt_path = latest_checkpoint(ckpt_dir)
        if ckpt_path is None:
            print(f"chimera: no checkpoint under {ckpt_dir}; starting from scratch", file=sys.stderr)
    logger = tracking.make_logger(cfg, run_name=run_name, tags=tags, run_id=run_id)
    uri = tracking.tracking_uri(cfg)
    every = int(cfg.checkpoint.every_n_steps)
    callbacks = [
        ModelCheckpoint(
            dirpath=str(ckpt_dir),
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every,
            save_top_k=int(cfg.checkpoint.keep),
            monitor="step",
            mode="max",
            save_last=bool(cfg.checkpoint.save_last),
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    trainer = pl.Trainer(
        **_trainer_kwargs(cfg),
        strategy=strategy,
        logger=logger,
        callbacks=callbacks,
        use_distributed_sampler=False,  # the datamodule shards its own seeded sampler
        default_root_dir=str(run_dir),
    )
    if trainer.is_global_zero:
        run_id = logger.run_id
        tracking.log_params(uri, run_id, tracking.flat_params(cfg, {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}))
        tracking.log_artifact_text(uri, run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    last = callbacks[0].last_model_path or callbacks[0].best_model_path or None
    return StageResult(name=run_name, run_id=logger.run_id if trainer.is_global_zero else "", checkpoint=last, metrics=metrics)


def train(config_path: str | Path, overrides: Sequence[str] = (), *, stage: str | None = None, resume: bool = False) -> TrainResult:
    """Train an experiment: all its stages in order (stage N starts from stage N-1's weights), or one."""
    from toolkit import tracking
    from toolkit.config import load_config, stage_config, to_yaml

    cfg = load_config(config_path, overrides)
    run_dir = Path(cfg.output_dir) / str(cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    state_file = run_dir / "run.json"
    state = json.loads(state_file.read_text()) if resume and state_file.is_file() else {}
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    tags = tracking.run_tags(cfg, config_path, list(overrides))
    uri = tracking.tracking_uri(cfg)
    tokenizer = build_tokenizer(cfg)
    stages = list(cfg.get("stages") or [])
    if not stages:
        result = fit_one(cfg, run_dir=run_dir, tokenizer=tokenizer, run_name=str(cfg.name), tags=tags, run_id=state.get("run_id"), resume=resume)
        if rank == 0:
            atomic_write_text(state_file, json.dumps({"run_id": result.run_id, "tracking_uri": uri}))
        return TrainResult(uri, str(cfg.tracking.experiment), result.run_id, str(run_dir), [result])

    names = [str(s["name"]) for s in stages]
    if stage is not None and stage not in names:
        raise ChimeraError(f"{config_path}: --stage {stage}: no such stage; stages: {', '.join(names)}")
    parent = state.get("parent_run_id")
    if parent is None and rank == 0:
        parent = tracking.start_parent_run(cfg, run_name=str(cfg.name), tags=tags)
        state["parent_run_id"] = parent
        atomic_write_text(state_file, json.dumps({**state, "tracking_uri": uri}))
    results = []
    previous = None
    for i, stage_node in enumerate(stages):
        stage_name = str(stage_node["name"])
        stage_dir = run_dir / f"stage{i + 1}_{stage_name}"
        done = state.get("stages", {}).get(stage_name, {})
        if (stage is not None and stage_name != stage) or done.get("finished"):
            previous = done.get("checkpoint") or _final_weights(stage_dir)
            continue
        scfg = stage_config(cfg, stage_node)
        stage_tags = {**tags, "mlflow.parentRunId": parent or "", "chimera.stage": stage_name}
        init = previous if previous is not None else None
        result = fit_one(
            scfg,
            run_dir=stage_dir,
            tokenizer=tokenizer,
            run_name=f"{cfg.name}/{stage_name}",
            tags=stage_tags,
            run_id=done.get("run_id"),
            init_from=init if not done else None,
            resume=resume and bool(done),
        )
        previous = result.checkpoint
        results.append(result)
        if rank == 0:
            state.setdefault("stages", {})[stage_name] = {"run_id": result.run_id, "checkpoint": result.checkpoint, "finished": True}
            atomic_write_text(state_file, json.dumps({**state, "tracking_uri": uri}))
    if rank == 0 and parent and (stage is None or stage == names[-1]):
        tracking.end_run(uri, parent)
    return TrainResult(uri, str(cfg.tracking.experiment), parent or "", str(run_dir), results)


def _final_weights(stage_dir: Path) -> str | None:
    from toolkit.checkpointing import latest_checkpoint

    path = latest_checkpoint(stage_dir / "checkpoints")
    return str(path) if path else None
