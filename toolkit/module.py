"""ChimeraModule: the LightningModule that trains a MultimodalModel.

It owns what is the same for every experiment: the loss (next-token cross-entropy on assistant tokens only,
normalised by the number of target tokens over the whole optimizer step: micro-batches and ranks), the
trainable set (glob patterns over module names), AdamW with warmup + cosine, validation metrics
(torchmetrics: loss and answer exact-match accuracy) and FSDP sharding in ``configure_model``. Throughput,
FLOPs and MFU are measured beside it by ``toolkit.perf.PerfMonitor``, which it hands Lightning in
``configure_callbacks``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from toolkit.errors import ChimeraError
from toolkit.model import MultimodalModel
from toolkit.perf import PerfMonitor, StepCounts, logs_this_step

IGNORE = -100


def token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shifted next-token loss. logits [B, T, V], labels [B, T] (-100 = no target).

    Returns (sum of token losses, number of target tokens, per-sample "every answer token right" [B]).
    """
    logits, targets = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t+1
    valid = targets != IGNORE
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    correct = (logits.argmax(-1) == targets) | ~valid
    exact = correct.all(dim=1) & valid.any(dim=1)
    return loss_sum, valid.sum(), exact


def select_trainable(
    model: nn.Module, patterns: Sequence[str] | None, where: str = "optim.trainable"
) -> list[str]:
    """Apply glob patterns (``connector.*``) to parameter names; returns the trainable names.

    ``None`` keeps each part's own choice (a frozen encoder stays frozen). Otherwise exactly the parameters
    matching a pattern train; a pattern matching nothing is an error (it is almost always a typo).
    """
    names = [n for n, _ in model.named_parameters()]
    if patterns is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            parts = sorted({n.split(".")[0] for n in names})
            raise ChimeraError(
                f"{where}: pattern '{pattern}' matches no parameter; top-level parts: {', '.join(parts)}"
            )
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
        if param.requires_grad:
            chosen.append(name)
    return chosen


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup then cosine decay to ``min_ratio`` at ``total`` steps."""

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


class ChimeraModule(pl.LightningModule):
    """Lightning wrapper: steps, metrics, optimizer, trainable set and sharding for one experiment.

    Logged every ``trainer.log_every_n_steps`` optimizer steps and at the last one (rank 0): ``train/loss``
    (mean over every target token of the step, all micro-batches and ranks) and ``train/target_tokens``;
    ``train/aux_loss`` (the decoder's auxiliary loss, per micro-batch) when the decoder has one. ``perf/*``
    come from ``toolkit.perf.PerfMonitor`` (``configure_callbacks``), which reads ``step_counts``: the
    global ``StepCounts`` of the last optimizer step, summed with one all-reduce per step.

    ``config`` is the resolved experiment (kept in checkpoints); ``perf.peak_tflops`` sets the per-device
    peak for ``perf/mfu``.
    """

    def __init__(
        self,
        model: MultimodalModel,
        *,
        optim: dict[str, Any],
        max_steps: int,
        shard: Callable[..., None] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim_cfg = dict(optim)
        self.max_steps = max_steps
        self._shard = shard
        # kept in checkpoints only: MLflow gets the curated params from toolkit.tracking (Lightning would log
        # the whole config as immutable params, and a resume with e.g. more steps would then fail)
        self.save_hyperparameters(
            {"config": config} if config is not None else {}, ignore=["model", "shard"], logger=False
        )
        self.trainable = select_trainable(model, self.optim_cfg.get("trainable"))
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()
        self._peak_tflops = ((config or {}).get("perf") or {}).get("peak_tflops")
        self.step_counts: StepCounts | None = None  # the last optimizer step's counts, all ranks
        self.truncated_total = 0.0  # samples cut at data.max_length since this fit started, all ranks
        self.skipped_total = (
            0.0  # bad records skipped (on_bad_sample: skip) since this fit started, all ranks
        )
        self.over_budget_total = 0.0  # samples the data.over_budget policy reduced, since this fit started
        self._window: Tensor | None = None  # this rank's StepCounts (as a tensor) over the current step
        self._unlogged: StepCounts | None = None  # counts of a step whose train/* are not yet logged
        self._params: list[nn.Parameter] | None = None  # the trainable parameters, once sharded

    def configure_callbacks(self) -> list[pl.Callback]:
        """Throughput, FLOPs, MFU and memory are measured beside the module (Lightning adds this to the
        trainer's callbacks, replacing a ``PerfMonitor`` given to the trainer)."""
        return [PerfMonitor(peak_tflops=self._peak_tflops)]

    # ----------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        """FSDP2: shard the wrap units then the root (called by Lightning on every rank, before it moves the
        model to the device); a model built on the meta device (``strategy.init: meta``) is then materialised
        shard by shard on the training device (``toolkit.strategies.fsdp2_sharder``)."""
        if self._shard is not None:
            strategy = self._trainer.strategy if self._trainer is not None else None
            device = getattr(strategy, "root_device", None)
            self._shard(self.model, getattr(self, "device_mesh", None), device)
            self._shard = None

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.model(batch["input_ids"], batch.get("images"), image_layout=batch.get("image_layout"))

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Returns this micro-batch's loss SUM; ``on_before_optimizer_step`` turns the step's gradient into
        the gradient of

            (sum over the step's target tokens of the cross-entropy
             + aux_loss_weight * sum over its micro-batches of n_mb * aux_mb) / N

        with N the target tokens of the whole step (all micro-batches and ranks), n_mb those of a micro-batch
        and aux_mb the decoder's auxiliary loss of that micro-batch (a mean over its tokens, e.g. MoE load
        balancing): each micro-batch's aux loss weighs like its target tokens, so the aux term is
        ``aux_loss_weight`` (``optim.aux_loss_weight``, default 1) times the token-weighted mean of the
        micro-batches' aux losses, whatever the accumulation and the number of ranks.
        """
        logits = self(batch)
        loss_sum, n_tokens, _ = token_losses(logits, batch["labels"])
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        lengths = mask.sum(1) if mask is not None else torch.full_like(ids[:, 0], ids.shape[1])
        counts = StepCounts(  # kept on the device: one sync per optimizer step
            target_tokens=n_tokens,
            loss_sum=loss_sum.detach(),
            samples=ids.shape[0],
            images=0 if batch.get("images") is None else batch["images"].shape[0],
            text_tokens=lengths.sum(),
            sum_sq_lengths=lengths.double().square().sum(),
            truncated=batch.get("n_truncated", 0),
            skipped=batch.get("n_skipped", 0),
            over_budget=batch.get("n_over_budget", 0),
        ).to_tensor()
        self._window = counts if self._window is None else self._window + counts
        loss = loss_sum
        aux = self.model.decoder.aux_loss() if hasattr(self.model.decoder, "aux_loss") else None
        if aux is not None:
            loss = loss + self.optim_cfg.get("aux_loss_weight", 1.0) * aux * n_tokens.clamp(min=1)
            self.log("train/aux_loss", aux.detach(), on_step=True, prog_bar=False)
        # Lightning divides by accumulate_grad_batches and DDP/FSDP average over ranks; the gradients are
        # rescaled to "sum over the step's target tokens / their global count" in on_before_optimizer_step.
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn accumulated per-token-sum gradients into the exact mean over all target tokens of the step.

        Each micro-batch returns its loss SUM. By now Lightning has divided every micro-batch loss by
        ``accumulate_grad_batches`` (A) and DDP/FSDP have averaged gradients over the W ranks, so the gradient
        is ``sum_tokens grad / (A * W)``; multiplying by ``A * W / N`` (N = target tokens of the whole step,
        all micro-batches and ranks) gives the gradient of the token mean, whatever the batches' lengths. This
        hook runs before Lightning clips gradients (and after a GradScaler unscaled them), so clipping sees
        the true gradient. A last, shorter accumulation window at an epoch end is exact too (N counts only
        its micro-batches, Lightning still divides by A).
        """
        local = self._window if self._window is not None else StepCounts().to_tensor(self.device)
        total = (
            self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
            if self.trainer.world_size > 1
            else local
        )
        counts = StepCounts.from_tensor(total)  # the step's one device-to-host copy
        scale = (
            self.trainer.world_size * self.trainer.accumulate_grad_batches / max(counts.target_tokens, 1.0)
        )
        if self._params is None:  # after configure_model: FSDP2 replaces parameters with sharded ones
            self._params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        self.step_counts = self._unlogged = counts
        self.truncated_total += counts.truncated
        self.skipped_total += counts.skipped
        self.over_budget_total += counts.over_budget
        self._window = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log ``train/*`` on the optimizer steps the logger writes (``self.log`` costs about half a
        millisecond per metric, so only there)."""
        counts, self._unlogged = self._unlogged, None
        if counts is None or not logs_this_step(self.trainer):  # mid-window micro-batch, or not logged
            return
        self.log_dict(
            {
                "train/loss": counts.loss_sum / max(counts.target_tokens, 1.0),
                "train/target_tokens": counts.target_tokens,
                "data/truncated": self.truncated_total,  # samples cut at data.max_length, so far
                "data/skipped": self.skipped_total,  # bad records replaced by the next good one, so far
                "data/over_budget": self.over_budget_total,  # samples cut to data.max_image_tokens, so far
            },
            on_step=True,
            rank_zero_only=True,
        )

    def on_train_start(self) -> None:
        self._params = None

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(batch)
        loss_sum, n_tokens, exact = token_losses(logits, batch["labels"])
        self.val_loss.update(loss_sum / n_tokens.clamp(min=1), weight=n_tokens)
        self.val_acc.update(exact.float())

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=False)
        self.log("val/acc", self.val_acc.compute(), prog_bar=True, sync_dist=False)
        self.val_loss.reset()
        self.val_acc.reset()

    # ----------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            skip = (
                p.ndim < 2
                or getattr(p, "_no_weight_decay", False)
                or "norm" in name
                or name.endswith(".bias")
            )
            (no_decay if skip else decay).append(p)
        if not decay and not no_decay:
            raise ChimeraError(
                "optim.trainable: no parameter is trainable; check the patterns and the parts' freeze flags"
            )
        groups = [
            {"params": decay, "weight_decay": cfg.get("weight_decay", 0.0)},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg["lr"],
            betas=tuple(cfg.get("betas", (0.9, 0.95))),
            eps=cfg.get("eps", 1e-8),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_lambda(int(cfg.get("warmup_steps", 0)), self.max_steps, float(cfg.get("min_lr_ratio", 0.1))),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
