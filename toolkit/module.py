"""ChimeraModule: the LightningModule that trains a MultimodalModel.

It owns what is the same for every experiment: the loss (next-token cross-entropy on assistant tokens only,
normalised by the number of target tokens over the whole optimizer step: micro-batches and ranks), the
trainable set (glob patterns over module names), AdamW with warmup + cosine, validation metrics
(torchmetrics: loss and answer exact-match accuracy), throughput, and FSDP sharding in ``configure_model``.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from toolkit.errors import ChimeraError
from toolkit.model import MultimodalModel

IGNORE = -100


def token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shifted next-token loss. logits [B, T, V], labels [B, T] (-100 = no target).

    Returns (sum of token losses, number of target tokens, per-sample "every answer token right" [B]).
    """
    logits, targets = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t+1
    valid = targets != IGNORE
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    correct = (logits.argmax(-1) == targets) | ~valid
    exact = correct.all(dim=1) & valid.any(dim=1)
    return loss_sum, valid.sum(), exact


def select_trainable(model: nn.Module, patterns: Sequence[str] | None, where: str = "optim.trainable") -> list[str]:
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
            raise ChimeraError(f"{where}: pattern '{pattern}' matches no parameter; top-level parts: {', '.join(parts)}")
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
    """Lightning wrapper: steps, metrics, optimizer, trainable set and sharding for one experiment."""

    def __init__(
        self,
        model: MultimodalModel,
        *,
        optim: dict[str, Any],
        max_steps: int,
        shard: Callable[[nn.Module, Any], None] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim_cfg = dict(optim)
        self.max_steps = max_steps
        self._shard = shard
        self.save_hyperparameters({"config": config} if config is not None else {}, ignore=["model", "shard"])
        self.trainable = select_trainable(model, self.optim_cfg.get("trainable"))
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()
        self._window: Tensor | None = None  # per optimizer step, this rank: tokens, loss sum, samples, images
        self._t_last: float | None = None

    # ----------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        """FSDP2: shard the wrap units then the root (called by Lightning on every rank)."""
        if self._shard is not None:
            self._shard(self.model, getattr(self, "device_mesh", None))
            self._shard = None

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.model(batch["input_ids"], batch.get("images"))

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch)
        loss_sum, n_tokens, _ = token_losses(logits, batch["labels"])
        n_images = 0 if batch.get("images") is None else batch["images"].shape[0]
        # [target tokens, loss sum, samples, images], kept on the device: one sync per optimizer step
        stats = torch.stack([n_tokens.double(), loss_sum.detach().double()])
        stats = torch.cat([stats, stats.new_tensor([batch["input_ids"].shape[0], n_images])])
        self._window = stats if self._window is None else self._window + stats
        loss = loss_sum
        aux = self.model.decoder.aux_loss() if hasattr(self.model.decoder, "aux_loss") else None
        if aux is not None:
            # the aux loss is a per-micro-batch mean: weigh it like one token-normalised micro-batch
            loss = loss + self.optim_cfg.get("aux_loss_weight", 1.0) * aux * n_tokens.clamp(min=1)
            self.log("train/aux_loss", aux.detach(), on_step=True, prog_bar=False)
        # Lightning divides by accumulate_grad_batches and DDP/FSDP average over ranks; the gradients are
        # rescaled to "sum over the step's target tokens / their global count" in on_before_optimizer_step.
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn accumulated per-token-sum gradients into the exact mean over all target tokens of the step."""
        local = self._window if self._window is not None else torch.zeros(4, dtype=torch.float64, device=self.device)
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum") if self.trainer.world_size > 1 else local
        total = total.tolist()
        n_tokens = max(float(total[0]), 1.0)
        scale = self.trainer.world_size * self.trainer.accumulate_grad_batches / n_tokens
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        now = time.perf_counter()
        self.log("train/loss", float(total[1]) / n_tokens, prog_bar=True, on_step=True, rank_zero_only=True)
        self.log("train/target_tokens", n_tokens, on_step=True, rank_zero_only=True)
        if self._t_last is not None:
            dt = now - self._t_last
            self.log("perf/step_time_s", dt, on_step=True, rank_zero_only=True)
            self.log("perf/samples_per_s", float(total[2]) / dt, on_step=True, rank_zero_only=True)
            self.log("perf/images_per_s", float(total[3]) / dt, on_step=True, rank_zero_only=True)
        self._t_last = now
        self._window = None

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
            skip = p.ndim < 2 or getattr(p, "_no_weight_decay", False) or "norm" in name or name.endswith(".bias")
            (no_decay if skip else decay).append(p)
        if not decay and not no_decay:
            raise ChimeraError("optim.trainable: no parameter is trainable; check the patterns and the parts' freeze flags")
        groups = [{"params": decay, "weight_decay": cfg.get("weight_decay", 0.0)}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg["lr"],
            betas=tuple(cfg.get("betas", (0.9, 0.95))),
            eps=cfg.get("eps", 1e-8),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(int(cfg.get("warmup_steps", 0)), self.max_steps, float(cfg.get("min_lr_ratio", 0.1)))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
