"""Honest exits: SIGTERM (what schedulers send) and SIGINT (Ctrl+C) stop a run at the next step boundary.

The run then checkpoints (``last.ckpt``, after the optimizer step in progress completes), its MLflow run is marked
KILLED, and ``chimera`` exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), so a scheduler or a
shell sees that the run did not finish; ``--resume`` continues exactly where it stopped. A second signal
stops at once (the default action).

Lightning's own SIGTERM handling ends ``fit`` with ``SystemExit`` (exit status 0) before ``on_train_end``, so
no checkpoint is written: ``GracefulStop`` replaces the handlers once training starts, and Lightning
puts them back when ``fit`` ends. With several ranks, the stop decision is all-reduced at every step, so
ranks the signal did not reach (Lightning's launcher signals only its first process) stop together.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from lightning.pytorch.callbacks import Callback

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop(Callback):
    """Install with ``install()`` before the run's objects are built; pass it to the Trainer as a callback."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = 0

    # ------------------------------------------------------------------------------------------ handlers
    def install(self) -> None:
        for sig in SIGNALS:
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(
            f"\nchimera: received {signal.Signals(signum).name}; stopping after the current step "
            "(send it again to stop at once)",
            file=sys.stderr,
        )

    # ------------------------------------------------------------------------------------------ callback
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._previous:  # Lightning registered its own SIGTERM handler when fit started: take it back
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient-accumulation window: the step is not complete
        signum = self.signum or 0
        if trainer.world_size > 1:
            import torch

            signum = int(
                trainer.strategy.reduce(torch.tensor(float(signum), device=pl_module.device), reduce_op="max")
            )
        if signum:
            self.signum = signum
            # Checkpoint here, where the step-scheduled checkpoints are written: the loop state is mid-epoch
            # and resumes exactly (by on_train_end Lightning has already counted the epoch as completed).
            for callback in trainer.checkpoint_callbacks:
                if getattr(callback, "save_last", False):
                    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
            trainer.should_stop = True  # ends fit after this step
