"""The Lightning ``Trainer`` of one stage: strategy, checkpoint schedule, logger and callbacks from config.

Checkpoints go to ``{stage run_dir}/checkpoints/``: ``stepNNNNNN.ckpt`` every ``checkpoint.every_n_steps``
(the newest ``checkpoint.keep`` kept) and ``last.ckpt``, which always holds the newest state, the final step
and a step stopped by a signal included. Single files are written atomically (``AtomicCheckpointIO``),
sharded FSDP checkpoints under a temporary name and renamed when complete (``toolkit.strategies``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _final_checkpoint_callback(**kwargs: Any) -> Any:
    """ModelCheckpoint that also writes ``last.ckpt`` when training ends (Lightning's saves only on its
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


def make_trainer(
    cfg: Any, run_dir: Path, *, strategy: Any, logger: Any, callbacks: Sequence[Any] = ()
) -> Any:
    """A ``lightning.Trainer`` for one stage's resolved config."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor
    from omegaconf import OmegaConf

    from toolkit.strategies import AtomicCheckpointIO

    checkpoint = _final_checkpoint_callback(
        dirpath=str(run_dir / "checkpoints"),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=int(cfg.checkpoint.every_n_steps),
        save_top_k=int(cfg.checkpoint.keep),
        monitor="step",
        mode="max",
        save_last=bool(cfg.checkpoint.save_last),
        enable_version_counter=False,  # overwrite last.ckpt, never write last-v1.ckpt
    )
    monitors = [LearningRateMonitor(logging_interval="step")] if logger else []
    return pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        strategy=strategy,
        logger=logger,
        callbacks=[checkpoint, *monitors, *callbacks],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the datamodule shards its own seeded sampler
        default_root_dir=str(run_dir),
    )
