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


# Dense peak TFLOP/s per device by compute dtype (vendor datasheets, SXM parts), used for MFU when
# ``perf.peak_tflops`` is not set. Matched against ``torch.cuda.get_device_name()``, first hit wins.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
PIPELINE = ("encoder", "pooler", "connector", "decoder")  # data flow order (the pooler has no parameters)


def peak_tflops(precision: str, device: torch.device | None = None) -> float | None:
    """Datasheet dense peak of the current CUDA device for ``precision``, or None (unknown device, CPU)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    if precision.startswith("bf16"):
        dtype = "bf16"
    elif precision.startswith("16"):
        dtype = "fp16"
    else:
        dtype = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[dtype]
    return None


class FlopsModel:
    """Model FLOPs of one optimizer step, from parameter counts (the usual 2N forward / 4N backward rule).

    Per token of the part that processes it (decoder: non-padding text tokens; connector: image tokens at its
    input; encoder: patch tokens), a weight matrix costs 2 FLOPs per parameter forward, 2 more backward for
    the activation gradient when anything upstream trains, and 2 more for its own weight gradient when it
    trains. So a parameter counts 6 (trainable), 4 (frozen, gradients flow through it: e.g. a frozen decoder
    behind a trained connector) or 2 (frozen with nothing trainable upstream: e.g. a frozen encoder). The
    embedding table is a lookup and counts 0. Decoder attention adds ``4 * d_attn * L^2`` FLOPs per layer and
    sample of length L forward (QK^T and AV, no causal discount, as in PaLM's MFU), times 3 when gradients
    flow. Not counted: Mamba scans, norms, activations, the encoder's attention scores.
    """

    def __init__(self, model: nn.Module) -> None:
        from toolkit import registry

        def counts(part: nn.Module | None, skip: tuple[nn.Module, ...] = ()) -> tuple[int, int]:
            if part is None:
                return 0, 0
            skipped = {id(p) for m in skip for p in m.parameters()}
            seen: set[int] = set()
            trainable = frozen = 0
            for p in part.parameters():
                if id(p) in seen or id(p) in skipped:
                    continue
                seen.add(id(p))
                if p.requires_grad:
                    trainable += p.numel()
                else:
                    frozen += p.numel()
            return trainable, frozen

        decoder = getattr(model, "decoder", None)
        embed = getattr(decoder, "embed_tokens", None)
        tied = (
            embed is not None and getattr(getattr(decoder, "lm_head", None), "weight", None) is embed.weight
        )
        self.params = {
            "encoder": counts(getattr(model, "encoder", None)),
            "pooler": counts(getattr(model, "pooler", None)),
            "connector": counts(getattr(model, "connector", None)),
            "decoder": counts(decoder, (embed,) if embed is not None and not tied else ()),
        }
        self.grad_flows: dict[str, bool] = {}  # does backward run through this part?
        upstream = False
        for part in PIPELINE:
            trainable = self.params[part][0] > 0
            self.grad_flows[part] = upstream or trainable
            upstream = upstream or trainable
        try:
            attention = registry.get("mixer", "attention").target
        except Exception:  # a registry without the built-in attention: no attention term
            attention = None
        self.attn_dims = [
            int(m.n_heads * m.head_dim)
            for m in (decoder.modules() if decoder is not None and attention is not None else ())
            if isinstance(m, attention)
        ]
        encoder = getattr(model, "encoder", None)
        pooler = getattr(model, "pooler", None)
        self.encoder_tokens = int(getattr(encoder, "num_tokens", 0))
        pooled = int(getattr(pooler, "num_tokens", self.encoder_tokens))
        self.connector_tokens = (
            self.encoder_tokens if getattr(model, "pool_after_connector", False) else pooled
        )

    def per_param(self, part: str) -> tuple[int, int]:
        """FLOPs per token per (trainable, frozen) parameter of ``part``."""
        return 6, (4 if self.grad_flows[part] else 2)

    def step(self, text_tokens: float, sum_sq_lengths: float, images: float) -> float:
        """FLOPs of one optimizer step with these totals (over micro-batches and ranks)."""
        tokens = {
            "encoder": images * self.encoder_tokens,
            "pooler": 0.0,
            "connector": images * self.connector_tokens,
            "decoder": text_tokens,
        }
        total = 0.0
        for part, (trainable, frozen) in self.params.items():
            f_train, f_frozen = self.per_param(part)
            total += tokens[part] * (f_train * trainable + f_frozen * frozen)
        attn_factor = 3 if self.grad_flows["decoder"] else 1
        total += attn_factor * 4 * sum(self.attn_dims) * sum_sq_lengths
        return total


def peak_memory_gb(device: torch.device) -> float:
    """CUDA ``max_memory_allocated``, else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


# One optimizer step's statistics, summed over its micro-batches on this rank (then over ranks):
STATS = ("target_tokens", "loss_sum", "samples", "images", "text_tokens", "sum_sq_lengths")


class ChimeraModule(pl.LightningModule):
    """Lightning wrapper: steps, metrics, optimizer, trainable set and sharding for one experiment.

    Logged every ``trainer.log_every_n_steps`` optimizer steps and at the last one (rank 0): ``train/loss``
    (mean over every target token of the step, all micro-batches and ranks), ``train/target_tokens``, and
    ``perf/*`` averaged over the steps since the previous log: ``step_time_s`` (wall time from the end of the
    previous step, after its checkpoint if any, to the end of this optimizer step: data loading included,
    validation excluded), ``tokens_per_s`` (non-padding text tokens, all ranks), ``samples_per_s``,
    ``images_per_s``, ``tflops`` (model FLOPs per second per device, see ``FlopsModel``), ``mfu`` (when a
    peak is known: ``perf.peak_tflops`` per device, else the datasheet value of a known GPU), and
    ``peak_mem_gb`` (CUDA max allocated, or the process's peak RSS on CPU, of rank 0).
    """

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
        # kept in checkpoints only: MLflow gets the curated params from toolkit.tracking (Lightning would log
        # the whole config as immutable params, and a resume with e.g. more steps would then fail)
        self.save_hyperparameters(
            {"config": config} if config is not None else {}, ignore=["model", "shard"], logger=False
        )
        self.trainable = select_trainable(model, self.optim_cfg.get("trainable"))
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()
        self.flops = FlopsModel(model)  # counted before sharding and activation checkpointing wrap anything
        cfg = config or {}
        self._peak_tflops = (cfg.get("perf") or {}).get("peak_tflops")
        self._precision = str((cfg.get("trainer") or {}).get("precision", "32-true"))
        self._window: Tensor | None = None  # this rank's STATS over the current optimizer step
        self._step_stats: list[float] | None = None  # the last step's STATS over all ranks
        self._t_mark: float | None = None  # end of the previous step (or of validation)
        self._t_step: float | None = None  # end of the last optimizer step
        self._perf: list[float] | None = None  # perf sums since the last logged step
        self._params: list[nn.Parameter] | None = None  # the trainable parameters, once sharded

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
        mask = batch.get("attention_mask")
        lengths = (
            mask.sum(1)
            if mask is not None
            else torch.full_like(batch["input_ids"][:, 0], batch["input_ids"].shape[1])
        )
        # STATS, kept on the device: one sync per optimizer step
        stats = torch.stack(
            [
                n_tokens.double(),
                loss_sum.detach().double(),
                lengths.sum().double(),
                lengths.double().square().sum(),
            ]
        )
        extra = stats.new_tensor([batch["input_ids"].shape[0], n_images])
        stats = torch.cat([stats[:2], extra, stats[2:]])
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
        """Turn accumulated per-token-sum gradients into the exact mean over all target tokens of the step.

        Each micro-batch returns its loss SUM. By now Lightning has divided every micro-batch loss by
        ``accumulate_grad_batches`` (A) and DDP/FSDP have averaged gradients over the W ranks, so the gradient
        is ``sum_tokens grad / (A * W)``; multiplying by ``A * W / N`` (N = target tokens of the whole step,
        all micro-batches and ranks) gives the gradient of the token mean, whatever the batches' lengths. This
        hook runs before Lightning clips gradients (and after a GradScaler unscaled them), so clipping sees
        the true gradient. A last, shorter accumulation window at an epoch end is exact too (N counts only
        its micro-batches, Lightning still divides by A).
        """
        local = (
            self._window
            if self._window is not None
            else torch.zeros(len(STATS), dtype=torch.float64, device=self.device)
        )
        total = (
            self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
            if self.trainer.world_size > 1
            else local
        )
        total = total.tolist()
        n_tokens = max(float(total[0]), 1.0)
        scale = self.trainer.world_size * self.trainer.accumulate_grad_batches / n_tokens
        if self._params is None:  # after configure_model: FSDP2 replaces parameters with sharded ones
            self._params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        self._step_stats = total
        self._window = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t_step = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Account for the step just finished; log on the steps the logger writes (``log_every_n_steps``).

        This hook runs after the callbacks' (so after a checkpoint save). ``self.log`` costs about half a
        millisecond per metric, so ``train/*`` go through it only on the steps Lightning writes to the
        logger, and ``perf/*`` (averages over all steps since the previous write, validation excluded) go
        straight to the logger, at the step number Lightning gives ``train/loss``.
        """
        stats, self._step_stats = self._step_stats, None
        if stats is None:  # a micro-batch inside an accumulation window
            return
        if self._t_mark is not None and self._t_step is not None:
            flops = self.flops.step(stats[4], stats[5], stats[3])
            row = [self._t_step - self._t_mark, stats[2], stats[3], stats[4], flops, 1.0]
            self._perf = row if self._perf is None else [a + b for a, b in zip(self._perf, row)]
        self._t_mark = time.perf_counter()
        trainer = self.trainer
        every = max(int(trainer.log_every_n_steps or 1), 1)
        last = trainer.should_stop or trainer.global_step >= trainer.max_steps
        if trainer.global_step % every and not last:
            return
        n_tokens = max(stats[0], 1.0)
        self.log_dict(
            {"train/loss": stats[1] / n_tokens, "train/target_tokens": stats[0]},
            on_step=True,
            rank_zero_only=True,
        )
        if self._perf is not None:
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(self._perf_metrics(self._perf), step=trainer.global_step - 1)
            self._perf = None

    def _perf_metrics(self, acc: list[float]) -> dict[str, float]:
        dt, samples, images, tokens, flops, steps = acc
        dt = max(dt, 1e-9)
        per_device = flops / dt / self.trainer.world_size
        values = {
            "perf/step_time_s": dt / steps,
            "perf/tokens_per_s": tokens / dt,
            "perf/samples_per_s": samples / dt,
            "perf/images_per_s": images / dt,
            "perf/tflops": per_device / 1e12,
            "perf/peak_mem_gb": peak_memory_gb(self.device),
        }
        peak = (
            self._peak_tflops if self._peak_tflops is not None else peak_tflops(self._precision, self.device)
        )
        if peak:
            values["perf/mfu"] = per_device / (float(peak) * 1e12)
        return values

    def on_train_start(self) -> None:
        self._params = None
        self._t_mark = time.perf_counter()

    def on_validation_end(self) -> None:
        self._t_mark = time.perf_counter()  # validation time is not step time

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
