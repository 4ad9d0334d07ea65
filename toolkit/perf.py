"""Throughput, model FLOPs, MFU and memory of training: a Lightning callback beside the LightningModule.

The module (``toolkit.module.ChimeraModule``) owns the loss and the gradient; once per optimizer step it sums
what the step processed over micro-batches and ranks (one all-reduce of one small tensor) and exposes it as
``step_counts``, a :class:`StepCounts`. :class:`PerfMonitor` times the steps, turns the counts into rates
with :class:`FlopsModel`, and logs ``perf/*`` beside ``train/loss``. A mixer states its own sequence cost with
``flops_per_token(seq_len)``, so a plugin's attention is counted like the built-in one.

MFU follows PaLM (Chowdhery et al., arXiv 2204.02311, appendix B): model FLOPs (no recomputation, no causal
discount) per second per device over the device's dense datasheet peak.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from toolkit.model import PARTS

# Dense peak TFLOP/s per device by compute dtype (vendor datasheets, SXM parts), used for MFU when
# ``perf.peak_tflops`` is not set. Matched against ``torch.cuda.get_device_name()``, first hit wins.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


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


def peak_memory_gb(device: torch.device) -> float:
    """CUDA ``max_memory_allocated``, else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


@dataclass
class StepCounts:
    """What one optimizer step processed, summed over its micro-batches (and then over ranks).

    ``ChimeraModule`` fills one per micro-batch (0-d tensors and numbers), keeps ``to_tensor()`` of it on the
    device (no host sync), sums the window, all-reduces it once before the optimizer step and reads it back with
    ``from_tensor`` (the step's one device-to-host copy) into plain floats: the module's ``step_counts``.
    """

    target_tokens: float = 0.0  # tokens with a label: the loss's denominator
    loss_sum: float = 0.0  # cross-entropy summed over the target tokens
    samples: float = 0.0
    images: float = 0.0
    text_tokens: float = 0.0  # non-padding positions of the decoder's sequences (image positions included)
    sum_sq_lengths: float = 0.0  # sum over samples of (non-padding length)^2: what attention scores cost
    truncated: float = 0.0  # samples the collator cut at data.max_length
    skipped: float = 0.0  # bad records a dataset replaced under on_bad_sample: skip
    over_budget: float = 0.0  # samples the data.over_budget policy reduced to data.max_image_tokens

    def to_tensor(self, device: torch.device | None = None) -> Tensor:
        """The fields, in declaration order, as one float64 vector on ``device`` (default: the tensors' own).

        Fields may be Python numbers or 0-d tensors. Nothing waits for the device: tensors are cast where
        they are and numbers are written by fill kernels (a host-to-device copy of a list would synchronise).
        """
        values = [getattr(self, f.name) for f in fields(self)]  # not astuple: it deep-copies tensors
        if device is None:
            device = next((v.device for v in values if isinstance(v, Tensor)), torch.device("cpu"))
        return torch.cat(
            [
                v.detach().reshape(1).to(device=device, dtype=torch.float64)
                if isinstance(v, Tensor)
                else torch.full((1,), float(v), dtype=torch.float64, device=device)
                for v in values
            ]
        )

    @classmethod
    def from_tensor(cls, values: Tensor) -> StepCounts:
        """Inverse of ``to_tensor`` (one device-to-host copy)."""
        names = [f.name for f in fields(cls)]
        if values.shape != (len(names),):
            raise ValueError(
                f"expected a vector of {len(names)} counts ({', '.join(names)}), got {values.shape}"
            )
        return cls(*values.tolist())


class FlopsModel:
    """Model FLOPs of one optimizer step, from parameter counts (the usual 2N forward / 4N backward rule).

    Per token of the part that processes it (decoder: non-padding text tokens; connector: image tokens at its
    input; encoder: patch tokens), a weight matrix costs 2 FLOPs per parameter forward, 2 more backward for
    the activation gradient when anything upstream trains, and 2 more for its own weight gradient when it
    trains. So a parameter counts 6 (trainable), 4 (frozen, gradients flow through it: e.g. a frozen decoder
    behind a trained connector) or 2 (frozen with nothing trainable upstream: e.g. a frozen encoder). The
    embedding table is a lookup and counts 0 (tied to the LM head, it counts once, as the head).

    Sequence-dependent cost: every module of the decoder whose class defines ``flops_per_token(seq_len) ->
    float`` (forward FLOPs per token of its sequence-dependent part in a sequence of ``seq_len`` tokens; the
    built-in attention says ``4 * n_heads * head_dim * seq_len``, QK^T and AV with no causal discount, as in
    PaLM's MFU) adds ``sum over samples of L * flops_per_token(L)``, times 3 when gradients flow. The step
    only knows ``sum L`` and ``sum L^2``, so the method is called once per step at the token-weighted mean
    length ``sum L^2 / sum L`` and multiplied by ``sum L``: exact for a cost affine in L (attention, linear
    attention, a scan), an approximation otherwise (e.g. a sliding window). Not counted: mixers without the
    method (the built-in Mamba scans), norms, activations, the encoder's attention scores.
    """

    def __init__(self, model: nn.Module) -> None:
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
        for part in PARTS:  # data flow order (the pooler has no parameters)
            trainable = self.params[part][0] > 0
            self.grad_flows[part] = upstream or trainable
            upstream = upstream or trainable
        # the class, not the instance: a wrapper forwarding attributes (activation checkpointing) is not a mixer
        self.sequence_costs: list[Callable[[float], float]] = [
            m.flops_per_token
            for m in (decoder.modules() if decoder is not None else ())
            if callable(getattr(type(m), "flops_per_token", None))
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
        if self.sequence_costs and text_tokens > 0:
            mean_len = sum_sq_lengths / text_tokens  # token-weighted mean sequence length
            forward = text_tokens * sum(float(cost(mean_len)) for cost in self.sequence_costs)
            total += (3 if self.grad_flows["decoder"] else 1) * forward
        return total

    def step_counts(self, counts: StepCounts) -> float:
        """``step`` for a module's ``StepCounts``."""
        return self.step(counts.text_tokens, counts.sum_sq_lengths, counts.images)


@dataclass
class PerfWindow:
    """Sums over the optimizer steps since the last logged one (this rank's view of global counts)."""

    seconds: float = 0.0
    steps: int = 0
    samples: float = 0.0
    images: float = 0.0
    text_tokens: float = 0.0
    flops: float = 0.0

    def add(self, seconds: float, counts: StepCounts, flops: float) -> None:
        self.seconds += seconds
        self.steps += 1
        self.samples += counts.samples
        self.images += counts.images
        self.text_tokens += counts.text_tokens
        self.flops += flops

    def metrics(
        self, world_size: int = 1, peak_tflops: float | None = None, peak_mem_gb: float | None = None
    ) -> dict[str, float]:
        """The ``perf/*`` values: rates over all ranks, except ``tflops``/``mfu`` (per device)."""
        dt = max(self.seconds, 1e-9)
        per_device = self.flops / dt / max(world_size, 1)
        values = {
            "perf/step_time_s": dt / max(self.steps, 1),
            "perf/tokens_per_s": self.text_tokens / dt,
            "perf/samples_per_s": self.samples / dt,
            "perf/images_per_s": self.images / dt,
            "perf/tflops": per_device / 1e12,
        }
        if peak_mem_gb is not None:
            values["perf/peak_mem_gb"] = peak_mem_gb
        if peak_tflops:
            values["perf/mfu"] = per_device / (float(peak_tflops) * 1e12)
        return values


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether the optimizer step just finished is written to the loggers: every ``log_every_n_steps`` and
    the last one (the same steps for ``train/*`` and ``perf/*``)."""
    every = max(int(trainer.log_every_n_steps or 1), 1)
    last = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
    return trainer.global_step % every == 0 or last


class PerfMonitor(pl.Callback):
    """Logs throughput, model TFLOP/s, MFU and peak memory of training (rank 0, straight to the loggers).

    Reads the LightningModule's ``step_counts`` (a :class:`StepCounts` with the global counts of the last
    optimizer step, a new object per step) and counts FLOPs with a :class:`FlopsModel` of its ``model``
    (built at ``setup``: before ``configure_model`` shards anything). Logged every
    ``trainer.log_every_n_steps`` optimizer steps and at the last one, at the step number Lightning gives
    ``train/loss``, averaged over the steps since the previous log:

    - ``perf/step_time_s``: wall time from the end of the previous step (after its checkpoint, if any) or of
      validation, to the end of this step's optimizer update (CUDA synchronised): data loading included,
      validation and checkpoint writes excluded;
    - ``perf/tokens_per_s`` (non-padding text tokens, all ranks), ``perf/samples_per_s``, ``perf/images_per_s``;
    - ``perf/tflops``: model FLOPs per second per device (see ``FlopsModel``);
    - ``perf/mfu``: ``tflops`` over the peak (``peak_tflops`` per device, else the datasheet value of a known
      GPU for ``trainer.precision``; absent when neither is known);
    - ``perf/peak_mem_gb``: CUDA max allocated, or the process's peak RSS on CPU, of rank 0.

    To exclude checkpoint writes the monitor runs after the checkpoint callbacks (Lightning puts
    ``ModelCheckpoint`` last; ``setup`` moves this callback behind it) and takes the end of the update from
    an optimizer step post-hook, which fires before any callback's ``on_train_batch_end``.
    """

    def __init__(self, peak_tflops: float | None = None, flops: FlopsModel | None = None) -> None:
        self.peak_tflops = peak_tflops
        self.flops = flops
        self._peak: float | None = None
        self._window = PerfWindow()
        self._mark: float | None = None  # end of the previous step, after its checkpoint (or of validation)
        self._step_end: float | None = None  # end of the last optimizer update
        self._counted: StepCounts | None = None  # the module's last counts already accounted for
        self._hooks: list[Any] = []
        self._device = torch.device("cpu")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.flops is None:
            self.flops = FlopsModel(getattr(pl_module, "model", pl_module))
        # a new list: Lightning is iterating the old one to call this hook
        trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device = pl_module.device
        self._peak = (
            self.peak_tflops
            if self.peak_tflops is not None
            else peak_tflops(str(trainer.precision), self._device)
        )
        self._hooks = [opt.register_step_post_hook(self._on_optimizer_step) for opt in trainer.optimizers]
        self._window, self._step_end, self._counted = PerfWindow(), None, None
        self._mark = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _on_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        self._step_end = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark = time.perf_counter()  # validation time is not step time

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        counts = getattr(pl_module, "step_counts", None)
        if counts is None or counts is self._counted:  # a micro-batch inside an accumulation window
            return
        self._counted = counts
        if self._step_end is None:  # the update was skipped (fp16 overflow): this is its end
            self._on_optimizer_step()
        if self._mark is not None and self.flops is not None:  # both set by setup/on_train_start
            self._window.add(self._step_end - self._mark, counts, self.flops.step_counts(counts))
        self._step_end = None
        self._mark = time.perf_counter()
        if not logs_this_step(trainer):
            return
        if self._window.steps and trainer.is_global_zero:
            metrics = self._window.metrics(trainer.world_size, self._peak, peak_memory_gb(self._device))
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step - 1)
        self._window = PerfWindow()
