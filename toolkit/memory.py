"""Memory plan: what one training step and one prefill need, per device and per host, before anything is built.

``estimate(plan)`` builds the model on the meta device (no memory, as ``chimera describe`` does) and reads every
size it needs from the built modules: parameter counts per part and per shard unit, which parameters train, and
the widths of each decoder layer's sub-layers. Everything else is arithmetic, so one estimate takes milliseconds
once the model is built, and "what would fit" questions (more devices, checkpointing, a shorter sequence) are
answered by re-running the arithmetic. ``check_fits`` turns an estimate into a one-line ``ChimeraError`` that
names the numbers and what to change; ``preflight`` (for ``toolkit.train``) runs both before any weight is
allocated. ``docs/memory.md`` shows the table for the reference model and compares it with published figures.

Training, per device (one micro-batch of ``batch_size`` sequences of ``seq_len`` tokens)::

    peak = parameters + weight copies + gradients (+ DDP buckets) + optimizer state
           + max(saved activations + loss working set, frozen-encoder forward)

The sum is the state at the end of a forward in a steady-state step: Lightning zeroes gradients *after* the
forward (``Closure``: step, zero_grad, backward), so the previous step's gradients are still alive when the
last activation is saved, and AdamW's two states exist from the first optimizer step on.

- parameters: the module's storage, fp32 under ``32-true`` and ``*-mixed`` (then it is the master copy the
  optimizer updates), bf16/fp16 under ``*-true``. FSDP divides by the number of devices; DDP does not. The
  memory policy of ``toolkit.strategies`` is followed: ``frozen_dtype`` stores (and runs) a frozen part in that
  dtype, ``shard_frozen: false`` keeps it whole on every rank, ``init: meta`` builds only the encoder on the host.
- weight copies: the low-precision copies compute uses. Under autocast (single device, DDP) every weight a
  forward touches is cast once and kept until backward where gradients flow through it (the cast cache for
  trained weights, the saved operand of frozen ones). Under FSDP2 the all-gathered units: the unit in use and
  the one prefetched, plus the unsharded root (embedding, head, connector) and one unit's fp32 unsharded
  gradient before its reduce-scatter; every unit when ``reshard_after_forward`` is false (one more with auto).
- gradients: trainable parameters only, in the parameter dtype (fp32 under mixed precision; FSDP2 reduces in
  fp32). DDP keeps a second copy in its all-reduce buckets (Lightning's default ``gradient_as_bucket_view=False``).
- optimizer: AdamW's ``exp_avg`` and ``exp_avg_sq``, in the parameter dtype, trainable parameters only.
- activations: what autograd saves for backward, per token per layer, derived from the layer shapes below and
  checked exactly against ``torch.autograd.graph.saved_tensors_hooks`` in the tests. A frozen module through
  which gradients flow still saves what its *input* gradient needs (e.g. SDPA's q, k, v, out), but not the
  inputs of its frozen weights; a module with nothing trainable upstream saves nothing.
- activation checkpointing (``strategy.activation_checkpointing``: true, or a list of unit kinds): each chosen
  shard unit (decoder layer, encoder block) keeps only its input, and backward recomputes one unit at a time
  (the largest one is counted), after the loss's backward has freed the logits.

Images: each counts as the token plan's largest image (``TokenPlan.largest_image``): one view of
``image_tokens``, or with AnyRes the largest grid's tokens (global view, tiles, newlines) and 1 + the most tiles
encoder views; the encoder, pooler and connector terms scale with views. Video frames are not counted.

Inference, one device, ``inference_batch`` sequences: weights in the compute dtype (or
``inference_weight_bytes``), the KV cache of every attention layer and the constant conv + SSM state of every
Mamba layer (sizes from each mixer's own ``allocate_cache``, built on the meta device), and the prefill's
working set: the largest of the frozen encoder over all images, one decoder layer over the whole context, and
the logits (``MultimodalModel.generate`` computes them for every prompt position).

Host: on ``cpu`` the host holds the whole training peak of every process of the node. On ``cuda`` every rank
builds the full fp32 model on the host before Lightning moves or shards it (the encoder only with ``init: meta``
under FSDP), so a node needs ``processes per node x parameters x 4 bytes`` of host memory at start.

Not counted: the CUDA context (~0.5 GB), NCCL and allocator fragmentation (often 5-10%), the dataloader, and
kernels' own scratch memory. ``--device-memory 80GB`` reads GB as 10^9 bytes, a little under an "80GB" card's
80 GiB (85.9e9 bytes): that ~7% is the headroom for them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from toolkit.errors import ChimeraError

F32 = 4  # bytes of an fp32 element
I64 = 8
GB = 10**9
SCAN_BLOCK = 32  # Mamba-1 PyTorch scan: one saved state per block (components/mixers/selective_scan.py)
SSD_CHUNK = 64  # Mamba-2 PyTorch SSD chunk (components/mixers/ssd.py)
KERNEL_SCAN_CHUNK = 2048  # mamba_ssm's selective_scan_fn keeps one state per 2048 steps

# ---------------------------------------------------------------------------------------------- memory strings
# k/m/g/t (and kb, mb, gb, tb) are powers of 1000; ki/mi/gi/ti (and kib, ...) powers of 1024
_UNITS = {"": 1, "b": 1} | {
    prefix + suffix: (1024 if "i" in suffix else 1000) ** power
    for power, prefix in enumerate("kmgt", start=1)
    for suffix in ("", "b", "i", "ib")
}
_MEMORY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: str | float | int, what: str = "memory") -> int:
    """Bytes in a memory size: ``80GB`` / ``80G`` = 80 * 10^9 (SI, as disks and Kubernetes count),
    ``80GiB`` / ``80Gi`` = 80 * 2^30, a bare number = bytes. An "80GB" GPU holds 80 GiB, so ``80GB`` leaves it
    about 7% of headroom for what the estimate does not count (CUDA context, NCCL, fragmentation)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ChimeraError(f"{what}: expected a positive size, got {value}")
        return int(value)
    m = _MEMORY.match(str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ChimeraError(
            f"{what}: cannot read '{value}' as a memory size; write e.g. 80GB (10^9 bytes) or 80GiB (2^30 bytes)"
        )
    size = float(m.group(1)) * _UNITS[unit]
    if size <= 0:
        raise ChimeraError(f"{what}: expected a positive size, got '{value}'")
    return int(size)


def gb(n: float) -> str:
    """Bytes as decimal gigabytes: ``38.40 GB``."""
    return f"{n / GB:.2f} GB"


# ---------------------------------------------------------------------------------------------- the result
@dataclass
class Part:
    """One line of the activation table: a kind of layer (or part), how many, and its saved bytes."""

    kind: str  # attention, mamba, mamba2, mlp, moe, other mixer/ffn names, encoder, connector, head, ...
    count: int  # layers of this kind (1 for a part)
    bytes: int  # saved for backward, all layers of the kind, one micro-batch, no checkpointing
    bytes_per_token: float  # per layer per token (per image token for the encoder and connector)


@dataclass
class MemoryPlan:
    """Per-device memory of a training step and of a prefill; every size in bytes."""

    config: str
    stage: str | None
    # settings the numbers are for
    accelerator: str  # "cuda" or "cpu"
    devices: int  # ranks in total
    processes_per_node: int
    strategy: str  # "single", "ddp" or "fsdp"
    precision: str
    activation_checkpointing: bool | tuple[str, ...]  # the config's: every unit, units of these kinds, none
    seq_len: int
    batch_size: int  # sequences per device per micro-batch
    images_per_sample: int
    image_tokens: int  # per image, the token plan's worst case (AnyRes: the largest grid with newlines)
    # the model
    params_total: int
    params_trainable: int
    # training, per device
    param_layout: str  # how parameters are stored: dtype, sharding, frozen parts
    params: int
    weight_copies: int
    grads: int
    grad_buckets: int
    optimizer: int
    activations: int  # saved for backward, no checkpointing, all parts
    activations_checkpointed: int
    loss_working_set: int  # logits and their fp32 copy while the loss runs (beside the saved log-softmax)
    encoder_forward: int  # a frozen encoder's forward working set (no graph), before the decoder runs
    parts: list[Part]
    train_peak: int  # with the config's activation checkpointing setting
    train_peak_no_checkpointing: int
    train_peak_checkpointing: int
    flops_per_token: float  # model FLOPs of a training step per decoder token (toolkit.perf.FlopsModel)
    # inference, one device
    inference_batch: int
    inference_context: int
    inference_weights: int
    kv_cache: int
    ssm_state: int
    prefill_working_set: int
    inference_peak: int
    # host, per node
    host_build: int  # processes per node x the fp32 model every rank builds before sharding
    host_peak: int  # what the node's host memory must hold
    device_memory: int | None = None
    host_memory: int | None = None
    notes: list[str] = field(default_factory=list)
    image_views: int = 1  # encoder views per image (an AnyRes image: global view + tiles)
    image_assumption: str = ""  # what image_tokens and image_views assume (the token plan's worst case)

    @property
    def static(self) -> int:
        return self.params + self.weight_copies + self.grads + self.grad_buckets + self.optimizer

    def fits_device(self) -> bool | None:
        if self.accelerator != "cuda" or self.device_memory is None:
            return None
        return self.train_peak <= self.device_memory

    def fits_host(self) -> bool | None:
        return None if self.host_memory is None else self.host_peak <= self.host_memory

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["static"] = self.static
        out["fits_device"] = self.fits_device()
        out["fits_host"] = self.fits_host()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---------------------------------------------------------------------------------------------- settings
PRECISION_BYTES = {  # precision -> (parameter bytes, compute bytes, autocast)
    "32-true": (4, 4, False),
    "32": (4, 4, False),
    "bf16-mixed": (4, 2, True),
    "16-mixed": (4, 2, True),
    "bf16-true": (2, 2, False),
    "bf16": (2, 2, False),
    "16-true": (2, 2, False),
    "16": (2, 2, False),
}


@dataclass
class Settings:
    accelerator: str
    devices: int
    processes_per_node: int
    strategy: str
    precision: str
    checkpointing: (
        bool | tuple[str, ...]
    )  # True: every shard unit; a tuple: units of these kinds; False: none
    reshard_after_forward: bool | str  # True, False or "auto"
    seq_len: int
    batch_size: int
    images: int
    inference_batch: int
    inference_weight_bytes: int | None
    init: str = "eager"  # strategy.init: "meta" builds all but the encoder on the meta device (FSDP only)
    frozen_bytes: int | None = None  # strategy.frozen_dtype: frozen parts stored (and run) in this many bytes
    shard_frozen: bool = True  # strategy.shard_frozen: false keeps frozen parts whole on every rank
    compute_override: int | None = None  # a frozen part running in its frozen dtype

    @property
    def param_bytes(self) -> int:
        return PRECISION_BYTES[self.precision][0]

    @property
    def compute_bytes(self) -> int:
        return self.compute_override or PRECISION_BYTES[self.precision][1]

    @property
    def autocast(self) -> bool:
        return PRECISION_BYTES[self.precision][2]

    @property
    def cuda(self) -> bool:
        return self.accelerator == "cuda"


# ---------------------------------------------------------------------------------------------- layer shapes
@dataclass
class Sub:
    """One sub-layer of a decoder layer (a mixer or an FFN) with the sizes its formula reads."""

    kind: str  # registry name: attention, mamba, mamba2, mlp, moe, or a plugin's
    module: Any
    trainable: bool


@dataclass
class Layer:
    subs: list[Sub]  # mixer first (when there is one), then the FFNs
    trainable: bool
    params: int
    d_model: int


@dataclass
class Unit:
    """A shard unit (FSDP group, checkpointing unit): its parameters, the part holding it, its kinds."""

    params: int
    trainable: int
    part: str
    kinds: set[
        str
    ]  # the part and the registry names of the mixers/FFNs inside (toolkit.strategies.unit_kinds)


@dataclass
class Shapes:
    """Everything the arithmetic reads from the meta-built model."""

    params_total: int
    params_trainable: int
    part_params: dict[str, tuple[int, int]]  # part -> (total, trainable)
    d_model: int
    vocab: int
    layers: list[Layer]
    embed_trainable: bool
    head_trainable: bool
    final_norm_trainable: bool
    encoder: Any
    encoder_trainable: bool
    encoder_tokens: int  # tokens the encoder processes per image (prefix tokens included)
    encoder_pre_norm: bool  # a LayerNorm before the blocks (CLIP's ln_pre)
    connector: Any
    connector_trainable: bool
    connector_tokens: int  # tokens per encoder view at the connector's input
    image_tokens: int  # decoder tokens per image: the token plan's worst case (AnyRes: the largest grid)
    pooling: bool  # the pooler reduces the encoder's tokens
    image_size: int
    units: list[Unit]  # every shard unit: decoder layers, then encoder blocks
    flops: Any  # toolkit.perf.FlopsModel
    cache_bytes: Callable[[int, int, int], tuple[int, int]]  # (batch, context, dtype bytes) -> (kv, ssm)
    image_views: int = 1  # encoder views per image: 1, or an AnyRes global view + the most tiles
    image_assumption: str = ""  # what image_tokens and image_views assume, printed with the plan
    frame_tokens: int | None = None  # decoder tokens of a video frame pooled by model.vision.frame_stride


def _count(module: Any) -> tuple[int, int]:
    from toolkit.model import count_params

    return count_params(module) if module is not None else (0, 0)


def _entry_names() -> dict[type, str]:
    """Registered mixer/FFN classes -> their registry names (how the formulas below are chosen)."""
    from toolkit.registry import entries

    return {e.target: e.name for e in entries() if e.kind in ("mixer", "ffn") and isinstance(e.target, type)}


def shapes(model: Any) -> Shapes:
    """Read the sizes the estimate needs from a (meta-device) ``MultimodalModel`` with its trainable set applied."""
    import torch

    from toolkit.perf import FlopsModel

    names = _entry_names()
    decoder, encoder, connector = model.decoder, model.encoder, model.connector
    layers, units = [], []
    for layer in getattr(decoder, "layers", []):
        mixer = getattr(layer, "mixer", None)
        modules = ([mixer] if mixer is not None else []) + list(getattr(layer, "ffns", []))
        subs = [Sub(names.get(type(m), type(m).__name__), m, _count(m)[1] > 0) for m in modules]
        total, tr = _count(layer)
        layers.append(Layer(subs, tr > 0, total, decoder.d_model))
        units.append(Unit(total, tr, "decoder", {"decoder", *(sub.kind for sub in subs)}))
    for block in getattr(encoder, "shard_units", lambda: [])():
        units.append(Unit(*_count(block), "encoder", {"encoder"}))
    total, trainable = _count(model)
    part_params = {p: _count(getattr(model, p)) for p in ("encoder", "pooler", "connector", "decoder")}
    grid = getattr(encoder, "patch_grid", None) or getattr(encoder, "grid", None)
    encoder_tokens = (
        int(grid[0]) * int(grid[1]) + int(getattr(encoder, "num_prefix_tokens", 0))
        if grid
        else int(encoder.num_tokens)
    )
    pooled = int(model.image_tokens)  # per view
    connector_tokens = int(encoder.num_tokens) if getattr(model, "pool_after_connector", False) else pooled
    # an image is as many decoder tokens and encoder views as its token plan allows at most (AnyRes: the
    # global view + tiles + newlines of the largest grid), not one view
    token_plan = getattr(model, "token_plan", None)
    image_tokens, image_views, assumption, frame_tokens = pooled, 1, "", None
    if token_plan is not None:
        grid, image_tokens, image_views = token_plan.largest_image()
        vision = token_plan.settings
        if grid is not None:
            newline = "newlines" if vision.newline else "no newlines"
            assumption = (
                f"AnyRes worst case: the {grid[0]}x{grid[1]} grid ({token_plan.view_tokens} global view + tiles, "
                f"{newline}, layout {vision.layout}) and {image_views} encoder views (global view + "
                f"{image_views - 1} tiles)"
            )
        if vision.frame_stride is not None:
            frame_tokens = int(token_plan.frame_tokens)

    def requires_grad(module: Any) -> bool:
        return module is not None and any(p.requires_grad for p in module.parameters())

    def cache_bytes(batch: int, context: int, dtype_bytes: int) -> tuple[int, int]:
        """(KV-like bytes that grow with the context, constant state bytes) from the mixers' allocate_cache."""
        dtype = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
        kv = const = 0
        for layer in getattr(decoder, "layers", []):
            mixer = getattr(layer, "mixer", None)
            if mixer is None or not hasattr(mixer, "allocate_cache"):
                continue
            sizes = []
            for n in (context, context + 1):
                state = mixer.allocate_cache(batch, n, device=torch.device("meta"), dtype=dtype)
                sizes.append(_tensor_bytes(state))
            if sizes[1] > sizes[0]:
                kv += sizes[0]
            else:
                const += sizes[0]
        return kv, const

    return Shapes(
        params_total=total,
        params_trainable=trainable,
        part_params=part_params,
        d_model=int(decoder.d_model),
        vocab=int(decoder.vocab_size),
        layers=layers,
        embed_trainable=requires_grad(getattr(decoder, "embed_tokens", None)),
        head_trainable=requires_grad(getattr(decoder, "lm_head", None)),
        final_norm_trainable=requires_grad(getattr(decoder, "final_norm", None)),
        encoder=encoder,
        encoder_trainable=requires_grad(encoder),
        encoder_tokens=encoder_tokens,
        encoder_pre_norm=isinstance(
            getattr(getattr(encoder, "model", None), "norm_pre", None), torch.nn.LayerNorm
        ),
        connector=connector,
        connector_trainable=requires_grad(connector),
        connector_tokens=connector_tokens,
        image_tokens=int(image_tokens),
        pooling=pooled != int(encoder.num_tokens),
        image_size=int(getattr(encoder, "image_size", 0) or 0),
        units=units,
        flops=FlopsModel(model),
        cache_bytes=cache_bytes,
        image_views=int(image_views),
        image_assumption=assumption,
        frame_tokens=frame_tokens,
    )


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a cache object (a dataclass, a tuple/list, or a tensor)."""
    import dataclasses

    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


# ---------------------------------------------------------------------------------------------- saved activations
# Each function returns (always, weight_only): bytes saved for backward per token of one layer.
#   always:      saved whenever gradients flow through the layer (what its input gradient needs);
#   weight_only: saved only when the layer's own weights train (the inputs of its Linear/conv weights).
# c = bytes of the compute dtype, L = sequence length, B = micro-batch; "f32" terms are fp32 whatever c is.
# The PyTorch-path formulas are exact for fp32 on CPU (tests/toolkit/test_memory.py compares them with
# saved_tensors_hooks); the CUDA-kernel formulas follow what mamba_ssm's autograd Functions save (read from
# their sources, not measured here).


def _norm(d: int, s: Settings) -> tuple[float, float]:
    """nn.RMSNorm. CPU (composite): input upcast to fp32 + rstd, and x*rstd for the weight gradient.
    CUDA (fused kernel): input + rstd; the weight gradient is recomputed."""
    if s.cuda:
        return s.compute_bytes * d + F32, 0.0
    return F32 * (d + 1), F32 * d


def _attention(m: Any, s: Settings) -> tuple[float, float]:
    """SDPA saves q, the repeated k and v (``repeat_interleave`` to n_heads), its output (also o_proj's input) and
    the fp32 log-sum-exp per head; RoPE adds a cos and a sin table per position. The q/k/v projections save
    their input (weight only)."""
    c, hd, h = s.compute_bytes, int(m.head_dim), int(m.n_heads)
    always = c * 4 * h * hd + F32 * h
    if getattr(m, "pos_emb", "none") == "rope":
        always += c * 2 * hd / max(s.batch_size, 1)
    return always, c * int(m.q_proj.in_features)


def _mamba(m: Any, s: Settings) -> tuple[float, float]:
    c, d, di, n, r = s.compute_bytes, int(m.d_model), int(m.d_inner), int(m.d_state), int(m.dt_rank)
    if _kernels(m, s):
        if not m.inner_norms:
            # mamba_inner_fn (checkpoint_lvl 1): xz, x_dbl, contiguous B and C, the scan output, one state per
            # 2048-step chunk; conv output and delta are recomputed in backward
            always = c * (2 * di + (r + 2 * n) + 2 * n + di) + F32 * di * 2 * n / KERNEL_SCAN_CHUNK
            return always, c * d
        # conv1d's contiguous input, its output u, fp32 dt/B/C before their RMSNorms (+ rstd), B/C/delta made
        # contiguous for selective_scan_fn, its output, xz (through z), one state per 2048 steps
        always = c * (2 * di + di + di + 2 * n + di + di) + F32 * (r + 2 * n + 3) + F32 * di * 2 * n / 2048
        return always, c * (d + r + di)  # in_proj input, dt_proj input, out_proj input (the gated output)
    conv_len = (s.seq_len + int(m.d_conv) - 1) / max(s.seq_len, 1)
    # xz (conv input and z), the conv output (SiLU input), then the fp32 scan: u, dt+bias, softplus(dt), B and C,
    # one [d_state, d_inner] state per SCAN_BLOCK steps, y + D*u, silu(z)
    always = c * (2 * di + di * conv_len) + F32 * (5 * di + 2 * n + n * di / SCAN_BLOCK)
    weight = c * (d + di + di)  # in_proj input, x_proj input (u), out_proj input
    if m.inner_norms:
        always += F32 * (r + 2 * n + 3)  # x_proj output: the RMSNorms' input, and 3 rstd
        weight += F32 * (r + 2 * n + r)  # x*rstd of the three norms, dt_proj input
    else:
        weight += F32 * (r + 2 * n)  # x_proj output, kept through dt_proj's input view
    return always, weight


def _mamba2(m: Any, s: Settings) -> tuple[float, float]:
    c, d = s.compute_bytes, int(m.d_model)
    di, h, p, n, g = int(m.d_ssm), int(m.nheads), int(m.headdim), int(m.d_state), int(m.ngroups)
    in_w = int(m.in_proj.out_features)
    conv = int(m.conv_dim)
    if _kernels(m, s):
        # zxbcdt (dt and z views), conv1d's contiguous input, contiguous x/B/C for the chunk scan, its output and
        # dA_cumsum; the gated RMSNorm runs in fp32: y, z, silu(z), the gated product, rstd
        always = c * (in_w + 2 * conv + di) + F32 * (h + 4 * di + g)
        weight = c * (d + di) + (F32 * di if m.rmsnorm else 0)
        return always, weight
    L = max(s.seq_len, 1)
    t = max(1, min(SSD_CHUNK, L))
    padded = math.ceil(L / t) * t / L
    # zxbcdt, the conv output and its SiLU; dt + bias and softplus(dt); after the SSD, y + D*x and the gated norm
    # (silu(z) and the gated product, + rstd)
    outside = c * (in_w + conv * (L + int(m.d_conv) - 1) / L + conv) + F32 * (
        2 * h + di + (2 * di + g if m.rmsnorm else di)
    )
    # the fp32 chunked SSD (ssd.py), on the sequence padded to whole chunks: x*dt and its copy for the matmul,
    # 4 [T, T] matrices per head (segment sums, their exp, the masked decay, C.B * decay), C.B and the copies of
    # B and C it multiplies, decays to the chunk's end and from its start (+ their clamp inputs), x*dt*decay,
    # B and C expanded per head, the chunk states and the entering states, the entering-state term
    inside = F32 * (2 * di + 4 * h * t + g * t + 2 * g * n + 4 * h + di + 2 * h * n + 2 * h * p * n / t + di)
    always = outside + inside * padded
    weight = c * (d + di) + (F32 * di if m.rmsnorm else 0)  # in_proj input, out_proj input, norm x*rstd
    return always, weight


def _mlp(m: Any, s: Settings) -> tuple[float, float]:
    """SwiGLU: gate output (SiLU input), silu(gate), up output; the inputs of gate/up and of down (weight only)."""
    c = s.compute_bytes
    d, f = int(m.gate_proj.in_features), int(m.gate_proj.out_features)
    return c * 3 * f, c * (d + f)


def _moe(m: Any, s: Settings) -> tuple[float, float]:
    """Top-k MoE: per routed copy of a token a SwiGLU's 3 d_ff (+ d_ff down input) and the gathered/combined
    d_model rows; router probabilities and top-k weights in fp32, three int64 index vectors."""
    if int(m.n_experts) == 1:
        return _mlp(m, s)
    c, d, f, k, e = s.compute_bytes, int(m.d_model), int(m.d_ff), int(m.top_k), int(m.n_experts)
    always = c * (3 * k * f + 2 * k * d) + F32 * (e + k) + I64 * 3 * k
    return always, c * (d + k * d + k * f)


def _generic(m: Any, s: Settings) -> tuple[float, float]:
    """A plugin without a formula: every Linear's input (weight only) and output (as if a nonlinearity saved
    it). A rough bound, flagged in the plan's notes."""
    from torch import nn

    c = s.compute_bytes
    ins = sum(x.in_features for x in m.modules() if isinstance(x, nn.Linear))
    outs = sum(x.out_features for x in m.modules() if isinstance(x, nn.Linear))
    return c * outs, c * ins


FORMULAS: dict[str, Callable[[Any, Settings], tuple[float, float]]] = {
    "attention": _attention,
    "mamba": _mamba,
    "mamba2": _mamba2,
    "mlp": _mlp,
    "moe": _moe,
}


def _kernels(m: Any, s: Settings) -> bool:
    """The CUDA kernel path is assumed on CUDA unless the mixer says ``use_kernels: never``."""
    return s.cuda and getattr(m, "use_kernels", "auto") != "never"


def _saved(always_weight: tuple[float, float], trainable: bool) -> float:
    always, weight = always_weight
    return always + (weight if trainable else 0.0)


def _vit_block(blk: Any, s: Settings) -> tuple[float, float] | None:
    """A timm ViT block: LayerNorms save input + mean/rstd; SDPA saves the qkv output, its output and the
    log-sum-exp; GELU saves fc1's output; qkv/fc1/fc2/proj save their inputs (weight only)."""
    attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
    if attn is None or mlp is None or not hasattr(attn, "qkv") or not hasattr(mlp, "fc1"):
        return None
    c, width, hidden = s.compute_bytes, int(attn.qkv.in_features), int(mlp.fc1.out_features)
    heads = int(getattr(attn, "num_heads", 1))
    always = c * (width + 3 * width + width + width + hidden) + F32 * (4 + heads)
    return always, c * (width + width + hidden)


def _sequential(module: Any, s: Settings) -> tuple[float, float]:
    """An MLP-like part walked in order: each Linear saves its input (weight only), each parameter-free leaf
    (an activation) saves the preceding Linear's output."""
    from torch import nn

    c, always, weight, last = s.compute_bytes, 0.0, 0.0, 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            weight += c * m.in_features
            last = m.out_features
        elif not list(m.children()) and not list(m.parameters(recurse=False)) and last:
            always += c * last
    return always, weight


# ---------------------------------------------------------------------------------------------- forward working sets
# Bytes per token alive at once while a sub-layer runs without autograd (inference prefill, a frozen encoder):
# its intermediate tensors, not the saved set.


def _work(sub: Sub, s: Settings) -> float:
    c, m = s.compute_bytes, sub.module
    if sub.kind == "attention":
        hd, h, kv = int(m.head_dim), int(m.n_heads), int(m.n_kv_heads)
        return c * (2 * h * hd + 2 * kv * hd + 2 * h * hd) + F32 * h  # q, out, k, v, repeated k and v
    if sub.kind == "mamba":
        di, n, r = int(m.d_inner), int(m.d_state), int(m.dt_rank)
        if _kernels(m, s):
            return c * (2 * di + 5 * di + r + 2 * n)  # xz, conv in/out, dt, dt^T, y; x_proj output
        return c * (5 * di + r + 2 * n) + F32 * (4 * di + 2 * n)  # + the fp32 scan's u, delta (x2), y
    if sub.kind == "mamba2":
        if _kernels(m, s):
            di = int(m.d_ssm)
            return c * (int(m.in_proj.out_features) + 2 * int(m.conv_dim) + di) + F32 * 5 * di
        return _saved(_mamba2(m, s), False)  # the chunked SSD's [T, T] matrices dominate; all alive at once
    if sub.kind == "mlp" or (sub.kind == "moe" and int(m.n_experts) == 1):
        return c * 3 * int(m.gate_proj.out_features if hasattr(m, "gate_proj") else m.d_ff)
    if sub.kind == "moe":
        k, d, f = int(m.top_k), int(m.d_model), int(m.d_ff)
        # routed copies, expert outputs, the combined output; one expert's SwiGLU if it took every token
        return c * (3 * k * d + 3 * f) + F32 * int(m.n_experts)
    always, weight = _generic(m, s)
    return always + weight


# ---------------------------------------------------------------------------------------------- the arithmetic
def _checkpointed(unit: Unit, selection: bool | tuple[str, ...]) -> bool:
    return selection is True or bool(selection and unit.kinds & set(selection))


def compute(sh: Shapes, s: Settings, *, config: str = "", stage: str | None = None) -> MemoryPlan:
    """The plan for these shapes and settings (pure arithmetic: cheap to call again with other settings)."""
    pb = s.param_bytes
    tokens = s.batch_size * s.seq_len
    images = s.batch_size * s.images
    views = images * sh.image_views  # what the encoder, pooler and connector run on
    notes: list[str] = []
    if s.images and sh.image_views > 1:
        notes.append(
            "AnyRes images are counted at their largest grid; very wide or tall images (unpadded to few rows) "
            "take fewer tokens for the same views, so a sequence of them encodes more: try --images N"
        )
    if s.images and sh.frame_tokens is not None:
        notes.append(
            f"video frames (model.vision.frame_stride: {sh.frame_tokens} tokens, 1 encoder view each) are not "
            f"counted: a sequence of frames alone would encode up to {s.seq_len // max(sh.frame_tokens, 1)} views"
        )
    fsdp = s.strategy == "fsdp"
    # strategy.frozen_dtype: a part none of whose parameters train is stored, and runs, in that dtype
    frozen = {part: total > 0 and tr == 0 for part, (total, tr) in sh.part_params.items()}
    kept = {part: bool(s.frozen_bytes) and frozen[part] for part in frozen}
    ps = {part: replace(s, compute_override=s.frozen_bytes) if kept[part] else s for part in frozen}
    c = s.compute_bytes
    # the second column checkpoints what the config selects, or every unit when the config selects none
    selection = s.checkpointing or True
    decoder_units, encoder_units = sh.units[: len(sh.layers)], sh.units[len(sh.layers) :]

    # -- gradient flow, in data order: encoder -> pooler -> connector -> splice -> layers -> norm -> head
    enc_flow = sh.encoder_trainable
    con_flow = enc_flow or sh.connector_trainable
    flow = (con_flow and images > 0) or sh.embed_trainable

    # -- saved activations per kind: [layers, bytes, bytes per token per layer]
    by_kind: dict[str, list[float]] = {}

    def add(kind: str, count: int, nbytes: float, per_token: float) -> None:
        row = by_kind.setdefault(kind, [0, 0.0, per_token])
        row[0] += count
        row[1] += nbytes
        row[2] = max(row[2], per_token)

    # Per sub-layer: its RMSNorm keeps what the input gradient needs only when the residual stream entering it
    # carries a gradient (``flow``), and x*rstd only when its weight trains; the sub-layer itself saves its
    # "always" set once anything at or before it trains.
    ds = ps["decoder"]
    cd = ds.compute_bytes
    unit_saved: list[float] = []  # per unit: saved bytes; per checkpointed unit only its input stays
    unit_input: list[float] = []
    for layer in sh.layers:
        layer_bytes = 0.0
        for sub in layer.subs:
            formula = FORMULAS.get(sub.kind)
            if formula is None:
                formula = _generic
                note = f"no memory formula for '{sub.kind}': counted every Linear's input and output"
                if note not in notes:
                    notes.append(note)
            norm_always, norm_weight = _norm(layer.d_model, ds)
            per_token = (norm_always if flow else 0.0) + (norm_weight if sub.trainable else 0.0)
            if flow or sub.trainable:
                per_token += _saved(formula(sub.module, ds), sub.trainable)
                add(sub.kind, 1, per_token * tokens, per_token)
            flow = flow or sub.trainable
            layer_bytes += per_token * tokens
        unit_saved.append(layer_bytes)
        unit_input.append(cd * layer.d_model * tokens if flow else 0.0)
    head = loss_ws = 0.0
    if flow or sh.head_trainable:
        # final norm; lm_head's input (weight only); the fp32 log-softmax cross_entropy keeps; the token ids
        # (embedding gradient) and the image-token mask
        head = tokens * (
            (_norm(sh.d_model, ds)[0] if flow else 0.0)
            + (_norm(sh.d_model, ds)[1] if sh.final_norm_trainable else 0.0)
            + (cd * sh.d_model if sh.head_trainable else 0)
            + F32 * sh.vocab
            + (I64 + 1 if sh.embed_trainable else 1)
        )
        add("head", 1, head, head / max(tokens, 1))
        loss_ws = tokens * sh.vocab * (cd + F32)  # while the loss runs: the logits and their fp32 copy

    encoder_forward = 0.0
    width = int(getattr(sh.encoder, "embed_dim", 0))
    es = ps["encoder"]
    ce = es.compute_bytes
    if images:
        blocks = list(getattr(sh.encoder, "shard_units", lambda: [])())
        if enc_flow:
            per_view = ce * 3 * sh.image_size**2  # patch embedding's input (weight only, the encoder trains)
            if sh.encoder_pre_norm:  # CLIP's LayerNorm before the blocks: its input, mean and rstd
                per_view += sh.encoder_tokens * (ce * width + 2 * F32)
            for blk, unit in zip(blocks, encoder_units):
                vit = _vit_block(blk, es)
                per_token = _saved(vit if vit is not None else _generic(blk, es), unit.trainable > 0)
                unit_saved.append(per_token * sh.encoder_tokens * views)
                unit_input.append(ce * width * sh.encoder_tokens * views)
                per_view += per_token * sh.encoder_tokens
            add("encoder", len(blocks), per_view * views, per_view / max(sh.encoder_tokens, 1))
            if sh.pooling:  # a pooler that reduces tokens keeps its input (average pooling's backward)
                add("pooler", 1, ce * width * sh.encoder_tokens * views, ce * width)
        else:
            # no graph: one block's working set over every view of the micro-batch (x, norm output, then the
            # larger of qkv + SDPA output and fc1 + GELU outputs), plus the views' pixels
            encoder_forward = views * (
                ce * sh.encoder_tokens * (2 * width + max(4 * width, 2 * _vit_hidden(blocks, width)))
                + F32 * 3 * sh.image_size**2
            )
        if con_flow:
            con = _saved(_sequential(sh.connector, ps["connector"]), sh.connector_trainable)
            add("connector", 1, con * sh.connector_tokens * views, con)
    activations = sum(row[1] for row in by_kind.values())

    # -- activation checkpointing: a checkpointed unit keeps its input; backward recomputes one unit at a time,
    # after the loss's backward has freed the logits and the log-softmax (so the two never coexist)
    units = decoder_units + encoder_units[: len(unit_saved) - len(decoder_units)]
    chosen = [_checkpointed(u, selection) for u in units]
    kept_acts = activations - sum(b for b, ck in zip(unit_saved, chosen) if ck)
    kept_acts += sum(i for i, ck in zip(unit_input, chosen) if ck)
    recompute = max((b for b, ck in zip(unit_saved, chosen) if ck), default=0.0)
    checkpointed = kept_acts + recompute

    # -- parameters (per part: its storage dtype, sharded or whole), gradients, optimizer state
    P, T = sh.params_total, sh.params_trainable
    whole = {part: not fsdp or (frozen[part] and not s.shard_frozen) for part in frozen}
    params = 0.0
    for part, (total, _) in sh.part_params.items():
        params += total * (s.frozen_bytes if kept[part] else pb) / (1 if whole[part] else s.devices)
    shard = s.devices if fsdp else 1
    grads = T * pb / shard
    optimizer = 2 * T * pb / shard
    grad_buckets = T * pb if s.strategy == "ddp" else 0
    weight_copies = 0.0
    if fsdp:
        # FSDP2 all-gathers a unit into unsharded storage of the compute dtype: the one in use and the one
        # prefetched (every unit when reshard_after_forward is false; with "auto" the last one stays too),
        # and the root's own parameters; a trained unit's unsharded fp32 gradient waits for its reduce-scatter
        gathered = [u for u in sh.units if not whole[u.part]]
        sizes = sorted((u.params * ps[u.part].compute_bytes for u in gathered), reverse=True)
        keep = {True: 2, "auto": 3}.get(s.reshard_after_forward, len(sizes))
        root = sum(
            total * ps[part].compute_bytes for part, (total, _) in sh.part_params.items() if not whole[part]
        ) - sum(u.params * ps[u.part].compute_bytes for u in gathered)
        grad_buffer = max([u.trainable for u in sh.units] + [T - sum(u.trainable for u in sh.units)])
        weight_copies = sum(sizes[:keep]) + root + F32 * grad_buffer
    elif s.autocast:
        weight_copies = c * _flowing_params(sh, con_flow, images, skip={p for p in kept if kept[p]})
    static = params + weight_copies + grads + grad_buckets + optimizer

    peak_plain = static + max(activations + loss_ws, encoder_forward)
    peak_ckpt = static + max(kept_acts + max(loss_ws, recompute - head), encoder_forward)
    train_peak = peak_ckpt if s.checkpointing else peak_plain

    # -- inference: one device, the whole model, in the compute dtype (or inference_weight_bytes)
    wbytes = s.inference_weight_bytes or c
    ctx = s.seq_len
    kv, ssm = sh.cache_bytes(s.inference_batch, ctx, c)
    itokens = s.inference_batch * ctx
    layer_ws = max(
        (3 * c * sh.d_model + _work(sub, s) for layer in sh.layers for sub in layer.subs), default=0.0
    )
    prefill = max(itokens * layer_ws, itokens * (c * sh.vocab + c * sh.d_model))
    if s.images:
        blocks = list(getattr(sh.encoder, "shard_units", lambda: [])())
        prefill = max(
            prefill,
            s.inference_batch
            * s.images
            * sh.image_views
            * (
                c * sh.encoder_tokens * (2 * width + max(4 * width, 2 * _vit_hidden(blocks, width)))
                + F32 * 3 * sh.image_size**2
            ),
        )
    inference_weights = P * wbytes
    inference_peak = inference_weights + kv + ssm + prefill

    # -- host: every rank builds the model in fp32 on the host (with init: meta under FSDP, the encoder only)
    built = sh.part_params["encoder"][0] if (s.init == "meta" and fsdp) else P
    host_build = s.processes_per_node * built * F32
    host_peak = host_build if s.cuda else max(s.processes_per_node * train_peak, host_build)

    flops = sh.flops.step(tokens, s.batch_size * float(s.seq_len) ** 2, views) / max(tokens, 1)
    parts = [Part(kind, int(n), int(nbytes), float(per)) for kind, (n, nbytes, per) in by_kind.items()]
    plan = MemoryPlan(
        config=config,
        stage=stage,
        accelerator=s.accelerator,
        devices=s.devices,
        processes_per_node=s.processes_per_node,
        strategy=s.strategy,
        precision=s.precision,
        activation_checkpointing=s.checkpointing,
        seq_len=s.seq_len,
        batch_size=s.batch_size,
        images_per_sample=s.images,
        image_tokens=sh.image_tokens,
        params_total=P,
        params_trainable=T,
        param_layout=_layout(s, kept, whole),
        params=int(params),
        weight_copies=int(weight_copies),
        grads=int(grads),
        grad_buckets=int(grad_buckets),
        optimizer=int(optimizer),
        activations=int(activations),
        activations_checkpointed=int(checkpointed),
        loss_working_set=int(loss_ws),
        encoder_forward=int(encoder_forward),
        parts=parts,
        train_peak=int(train_peak),
        train_peak_no_checkpointing=int(peak_plain),
        train_peak_checkpointing=int(peak_ckpt),
        flops_per_token=float(flops),
        inference_batch=s.inference_batch,
        inference_context=ctx,
        inference_weights=int(inference_weights),
        kv_cache=int(kv),
        ssm_state=int(ssm),
        prefill_working_set=int(prefill),
        inference_peak=int(inference_peak),
        host_build=int(host_build),
        host_peak=int(host_peak),
        notes=notes,
        image_views=sh.image_views,
        image_assumption=sh.image_assumption,
    )
    plan._shapes, plan._settings = sh, s  # for check_fits' "what would fit" answers
    return plan


def _layout(s: Settings, kept: dict[str, bool], whole: dict[str, bool]) -> str:
    dtype = "fp32" if s.param_bytes == 4 else "16-bit"
    text = dtype + (f", 1/{s.devices} each" if s.strategy == "fsdp" else "")
    frozen = [part for part, k in kept.items() if k]
    if frozen:
        text += f"; frozen {'+'.join(frozen)} in {'fp32' if s.frozen_bytes == 4 else '16-bit'}"
    unsharded = [part for part, w in whole.items() if w] if s.strategy == "fsdp" else []
    if unsharded:
        text += f"; {'+'.join(unsharded)} whole"
    return text


def _vit_hidden(blocks: list[Any], width: int) -> int:
    """The MLP width of a timm ViT block (4 x width when the blocks do not say)."""
    for blk in blocks:
        mlp = getattr(blk, "mlp", None)
        if mlp is not None and hasattr(mlp, "fc1"):
            return int(mlp.fc1.out_features)
    return 4 * width


def _flowing_params(sh: Shapes, con_flow: bool, images: int, skip: set[str]) -> int:
    """Parameters whose 16-bit copy autocast keeps until backward: those of the parts gradients flow through
    (the embedding is a lookup, not cast), except parts stored in a frozen dtype (``skip``)."""
    total = 0
    if sh.encoder_trainable and "encoder" not in skip:
        total += sh.part_params["encoder"][0]
    if con_flow and images and "connector" not in skip:
        total += sh.part_params["connector"][0]
    if "decoder" in skip:
        return total
    flow = (con_flow and images > 0) or sh.embed_trainable
    for layer in sh.layers:
        flow = flow or layer.trainable
        if flow:
            total += layer.params
    if flow or sh.head_trainable:
        total += sh.vocab * sh.d_model  # lm_head
    return total


# ---------------------------------------------------------------------------------------------- from a config
def _settings(
    cfg: Any,
    *,
    devices: int | None,
    seq_len: int | None,
    batch_size: int | None,
    images: int | None,
    image_tokens: int,
    accelerator: str | None,
    device_memory: int | None,
    inference_batch: int,
    inference_weight_bytes: int | None,
) -> Settings:
    trainer, strategy, data = cfg.trainer, cfg.strategy, cfg.data
    precision = str(trainer.get("precision", "32-true"))
    if precision not in PRECISION_BYTES:
        raise ChimeraError(
            f"trainer.precision: '{precision}' is not supported; choose one of {', '.join(PRECISION_BYTES)}",
            key="trainer.precision",
        )
    accel = accelerator or _accelerator(str(trainer.get("accelerator", "auto")), device_memory)
    nodes = max(int(trainer.get("num_nodes", 1) or 1), 1)
    if devices is None:
        per_node = trainer.get("devices", 1)
        if not isinstance(per_node, int):
            per_node = _cuda_count() if accel == "cuda" else 1
        devices = max(int(per_node), 1) * nodes
    devices = max(int(devices), 1)
    name = str(strategy.get("name", "auto"))
    kind = "fsdp" if name == "fsdp" else ("ddp" if name == "ddp" or devices > 1 else "single")
    seq = int(seq_len if seq_len is not None else data.get("max_length", 512))
    batch = int(batch_size if batch_size is not None else data.get("batch_size", 1))
    if seq < 1 or batch < 1:
        raise ChimeraError(f"seq_len and batch_size must be >= 1, got {seq} and {batch}")
    if images is None:
        images = seq // max(image_tokens, 1)  # the worst case: images fill the sequence
    reshard = strategy.get("reshard_after_forward", True)
    frozen_dtype = strategy.get("frozen_dtype")
    return Settings(
        accelerator=accel,
        devices=devices,
        processes_per_node=max(devices // nodes, 1),
        strategy=kind,
        precision=precision,
        checkpointing=_checkpoint_setting(strategy.get("activation_checkpointing", False)),
        reshard_after_forward=reshard if reshard == "auto" else bool(reshard),
        seq_len=seq,
        batch_size=batch,
        images=int(images),
        inference_batch=int(inference_batch),
        inference_weight_bytes=inference_weight_bytes,
        init=str(strategy.get("init", "eager") or "eager"),
        frozen_bytes=FROZEN_BYTES.get(frozen_dtype) if frozen_dtype else None,
        shard_frozen=bool(strategy.get("shard_frozen", True)),
    )


FROZEN_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _checkpoint_setting(value: Any) -> bool | tuple[str, ...]:
    """``strategy.activation_checkpointing``: true, false or a list of unit kinds (toolkit.strategies)."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    items = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
    return items or False


def _accelerator(name: str, device_memory: int | None) -> str:
    if name in ("gpu", "cuda"):
        return "cuda"
    if name == "cpu":
        return "cpu"
    if device_memory is not None:  # planning for a device of a given size
        return "cuda"
    return "cuda" if _cuda_count() else "cpu"


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def build_shapes(cfg: Any, tokenizer: Any, trainable: Any = None, where: str = "optim.trainable") -> Shapes:
    """Build ``cfg``'s model on the meta device (no memory), apply the trainable set, read its shapes."""
    import torch

    from toolkit.assemble import build_model
    from toolkit.module import select_trainable

    with torch.device("meta"):
        model = build_model(cfg, tokenizer)
    select_trainable(model, trainable if trainable is not None else cfg.optim.get("trainable"), where=where)
    return shapes(model)


def estimate(
    plan_or_cfg: Any,
    tokenizer: Any = None,
    *,
    devices: int | None = None,
    device_memory: float | str | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    images: int | None = None,
    accelerator: str | None = None,
    host_memory: float | str | None = None,
    inference_batch: int = 1,
    inference_weight_bytes: int | None = None,
) -> MemoryPlan:
    """The memory plan of an experiment: a ``Plan``, a resolved config (with ``tokenizer``) or a YAML path.

    Defaults come from the config: ``devices`` = trainer.devices x trainer.num_nodes, ``seq_len`` =
    data.max_length, ``batch_size`` = data.batch_size (per device), ``images`` per sample = as many as fill the
    sequence (the worst case for the encoder), the accelerator from trainer.accelerator (``auto``: cuda when a
    GPU is visible or ``device_memory`` is given). For a staged recipe every stage is estimated (each has its
    own trainable set, batch and length) and the one with the highest training peak is returned.
    ``device_memory``/``host_memory`` (bytes or strings like ``80GB``) are recorded for ``check_fits``.
    """
    from toolkit.plan import Plan, load_plan

    if isinstance(plan_or_cfg, (str, Path)):
        plan_or_cfg = load_plan(plan_or_cfg, check_model=False)
    dev_mem = parse_memory(device_memory, "--device-memory") if device_memory is not None else None
    host_mem = parse_memory(host_memory, "host memory") if host_memory is not None else None
    if isinstance(plan_or_cfg, Plan):
        plan = plan_or_cfg
        tokenizer = tokenizer if tokenizer is not None else plan.tokenizer
        targets = [(s.cfg, s.name if plan.staged else None, s.label) for s in plan.stages]
        config = str(plan.config_path)
    else:
        if tokenizer is None:
            from toolkit.assemble import build_tokenizer

            tokenizer = build_tokenizer(plan_or_cfg)
        targets = [(plan_or_cfg, None, "optim.trainable")]
        config = str(plan_or_cfg.get("name") or "")
    best: MemoryPlan | None = None
    built: list[tuple[Any, Shapes]] = []
    for cfg, stage, label in targets:
        from omegaconf import OmegaConf

        key = (
            OmegaConf.to_container(cfg.model, resolve=True),
            OmegaConf.to_container(cfg.optim, resolve=True),
        )
        sh = next((b for k, b in built if k == key), None)
        if sh is None:
            where = f"{label}: trainable" if stage is not None else "optim.trainable"
            sh = build_shapes(cfg, tokenizer, where=where)
            built.append((key, sh))
        s = _settings(
            cfg,
            devices=devices,
            seq_len=seq_len,
            batch_size=batch_size,
            images=images,
            image_tokens=sh.image_tokens,
            accelerator=accelerator,
            device_memory=dev_mem,
            inference_batch=inference_batch,
            inference_weight_bytes=inference_weight_bytes,
        )
        result = compute(sh, s, config=config, stage=stage)
        result.device_memory, result.host_memory = dev_mem, host_mem
        if best is None or result.train_peak > best.train_peak:
            best = result
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------- host and device
def available_host_bytes() -> int | None:
    """Memory this process can still take from the host: MemAvailable (psutil or /proc/meminfo), lowered to the
    cgroup's limit minus its usage when a container limit is set; None when unknown."""
    avail: int | None = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024  # kB in /proc/meminfo are KiB
                        break
        except OSError:
            pass
    for base, limit_name, usage_name, cache_name in (
        ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),  # cgroup v2
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        try:
            limit = Path(base, limit_name).read_text().strip()
            usage = int(Path(base, usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 2**60:  # "max", or v1's "no limit"
            break
        try:  # reclaimable page cache counts as usage but not as taken (kubelet's working set)
            for line in Path(base, "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_name:
                    usage -= int(value)
        except (OSError, ValueError):
            pass
        left = max(int(limit) - usage, 0)
        avail = left if avail is None else min(avail, left)
        break
    return avail


def device_memory_bytes() -> int | None:
    """Total memory of the first visible GPU from ``nvidia-smi`` (no CUDA context is created), else None."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    index = 0
    if visible and visible.split(",")[0].strip().isdigit():
        index = int(visible.split(",")[0])
    try:
        return int(float(out[index])) * 2**20  # MiB
    except (IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- fitting
def _retry(plan: MemoryPlan, **changes: Any) -> MemoryPlan:
    sh: Shapes = plan._shapes  # type: ignore[attr-defined]
    s: Settings = plan._settings  # type: ignore[attr-defined]
    new = replace(s, **changes)
    if "devices" in changes:
        nodes = max(s.devices // max(s.processes_per_node, 1), 1)
        new = replace(new, processes_per_node=max(new.devices // nodes, 1))
    return compute(sh, new, config=plan.config, stage=plan.stage)


def _largest(plan: MemoryPlan, key: str, hi: int, fits: Callable[[MemoryPlan], bool]) -> int | None:
    """The largest value of ``key`` in [1, hi) whose plan fits, by bisection (memory grows with it)."""
    if not fits(_retry(plan, **{key: 1})):
        return None
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(_retry(plan, **{key: mid})):
            lo = mid
        else:
            hi = mid
    return lo


def suggestions(plan: MemoryPlan, limit: int, measure: str = "device") -> str:
    """What to change, cumulatively and cheapest first, until the training peak per device (``measure="device"``)
    or the node's host memory (``"host"``) is under ``limit``; each step with the figure it leads to."""
    if not hasattr(plan, "_shapes"):
        return ""
    s: Settings = plan._settings  # type: ignore[attr-defined]

    def value(p: MemoryPlan) -> int:
        return p.train_peak if measure == "device" else p.host_peak

    def fits(p: MemoryPlan) -> bool:
        return value(p) <= limit

    if measure == "host" and s.cuda:
        text = "change: fewer processes per node (trainer.devices), or a host with more memory"
        if s.init != "meta":
            meta = _retry(plan, init="meta", strategy="fsdp")
            text += (
                f"; or strategy.init=meta with strategy.name=fsdp: every rank builds only the encoder on the host"
                f" ({gb(meta.host_peak)})"
            )
        return text
    steps: list[str] = []
    cur = plan

    def step(text: str, new: MemoryPlan, hint: str = "") -> None:
        nonlocal cur
        if value(new) < value(cur):
            steps.append(f"{text} ({gb(value(new))}{hint})")
            cur = new

    if s.cuda and s.precision in ("32-true", "32"):
        step("trainer.precision=bf16-mixed", _retry(cur, precision="bf16-mixed"))
    if not fits(cur) and s.checkpointing is not True:
        step("strategy.activation_checkpointing=true", _retry(cur, checkpointing=True))
    if not fits(cur) and s.strategy != "fsdp" and s.devices > 1:
        step("strategy.name=fsdp", _retry(cur, strategy="fsdp"))
    batch = cur._settings.batch_size  # type: ignore[attr-defined]
    if not fits(cur) and batch > 1:
        b = _largest(cur, "batch_size", batch, fits) or 1
        hint = "; raise trainer.accumulate_grad_batches to keep the global batch"
        step(f"data.batch_size={b}", _retry(cur, batch_size=b), hint)
    if not fits(cur) and s.cuda:
        base = cur if cur._settings.strategy == "fsdp" else _retry(cur, strategy="fsdp")  # type: ignore[attr-defined]
        for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            if n > s.devices and fits(_retry(base, devices=n)):
                step(f"strategy.name=fsdp over {n} devices", _retry(base, devices=n))
                break
    if not fits(cur):
        L = _largest(cur, "seq_len", cur._settings.seq_len, fits)  # type: ignore[attr-defined]
        if L is not None:
            step(f"data.max_length (--seq-len) <= {L:,}", _retry(cur, seq_len=L))
    text = f"change, in this order: {', then '.join(steps)}" if steps else ""
    if not fits(cur):
        floor = _retry(cur, seq_len=1, images=0)
        text += (
            f"{'; even so' if steps else 'nothing here fits it:'} it needs {gb(value(cur))}, of which "
            f"{gb(value(floor))} do not depend on the sequence (parameters, gradients, optimizer state)"
        )
    if measure == "host":
        text += "; or train on GPUs (trainer.accelerator=gpu)"
    return text


def problems(
    plan: MemoryPlan, *, host_memory: float | str | None = None, device_memory: float | str | None = None
) -> list[str]:
    """One message per memory the plan does not fit (empty when it fits, or when nothing is known)."""
    host = parse_memory(host_memory, "host memory") if host_memory is not None else plan.host_memory
    device = (
        parse_memory(device_memory, "--device-memory") if device_memory is not None else plan.device_memory
    )
    what = f"{plan.config}" + (f" (stage {plan.stage})" if plan.stage else "")
    setting = (
        f"{plan.strategy} over {plan.devices} device(s), {plan.precision}, batch {plan.batch_size} x "
        f"{plan.seq_len:,} tokens, activation checkpointing {_ckpt_text(plan.activation_checkpointing)}"
    )
    out = []
    if plan.accelerator == "cuda" and device is not None and plan.train_peak > device:
        fixes = suggestions(plan, device, "device")
        out.append(
            f"{what}: a training step needs about {gb(plan.train_peak)} per device ({_breakdown(plan)}; "
            f"{setting}) but a device has {gb(device)}" + (f"; {fixes}" if fixes else "")
        )
    if host is not None and plan.host_peak > host:
        if plan.accelerator == "cuda":
            each = plan.host_build / max(plan.processes_per_node, 1)
            built = "model" if each >= plan.params_total * F32 else "encoder (strategy.init: meta)"
            head = (
                f"{what}: every one of the {plan.processes_per_node} process(es) on this node builds the fp32 "
                f"{built} on the host before sharding it ({gb(each)} each), {gb(plan.host_peak)} in all, but "
                f"the host has {gb(host)} available"
            )
        else:
            head = (
                f"{what}: training on the CPU needs about {gb(plan.host_peak)} of host memory "
                f"({plan.processes_per_node} process(es) x {gb(plan.train_peak)}: {_breakdown(plan)}; {setting})"
                f" but the host has {gb(host)} available"
            )
        fixes = suggestions(plan, host, "host")
        out.append(head + (f"; {fixes}" if fixes else ""))
    return out


def _ckpt_text(value: bool | tuple[str, ...]) -> str:
    if value is True:
        return "on"
    return f"on for {', '.join(value)}" if value else "off"


def _breakdown(plan: MemoryPlan) -> str:
    acts = plan.activations_checkpointed if plan.activation_checkpointing else plan.activations
    return (
        f"parameters {gb(plan.params)}, gradients {gb(plan.grads + plan.grad_buckets)}, optimizer "
        f"{gb(plan.optimizer)}, weight copies {gb(plan.weight_copies)}, activations {gb(acts)}, "
        f"loss {gb(plan.loss_working_set)}"
    )


def fits(
    plan: MemoryPlan, *, host_memory: float | str | None = None, device_memory: float | str | None = None
) -> bool:
    return not problems(plan, host_memory=host_memory, device_memory=device_memory)


def check_fits(
    plan: MemoryPlan, *, host_memory: float | str | None = None, device_memory: float | str | None = None
) -> None:
    """Raise ``ChimeraError`` (one line: the numbers and what to change) when the plan does not fit."""
    found = problems(plan, host_memory=host_memory, device_memory=device_memory)
    if found:
        raise ChimeraError(" | ".join(found))


def preflight(
    plan: Any, *, host_memory: float | str | None = None, device_memory: float | str | None = None
) -> MemoryPlan | None:
    """What ``chimera train`` runs before building anything: the config's own settings against this host's
    available memory and (on CUDA) the first GPU's size. Raises ``ChimeraError`` when it does not fit.

    ``CHIMERA_SKIP_MEMORY_CHECK=1`` skips it (a plugin without a formula can be overestimated)."""
    if os.environ.get("CHIMERA_SKIP_MEMORY_CHECK", "").strip() not in ("", "0"):
        return None
    result = estimate(plan)
    host = host_memory if host_memory is not None else available_host_bytes()
    device = device_memory
    if device is None and result.accelerator == "cuda":
        device = device_memory_bytes()
    try:
        check_fits(result, host_memory=host, device_memory=device)
    except ChimeraError as exc:
        raise ChimeraError(f"{exc} (CHIMERA_SKIP_MEMORY_CHECK=1 trains without this check)") from exc
    return result


# ---------------------------------------------------------------------------------------------- the table
def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table (decimal GB): training per device with and without activation checkpointing,
    inference on one device, and the host."""
    W, C = 46, 16  # label width, column width

    def row(label: str, *cols: str) -> str:
        return (f"{label:<{W}}" + "".join(f"{col:>{C}}" for col in cols)).rstrip()

    def both(label: str, a: float, b: float | None = None) -> str:
        return row(label, gb(a), gb(a if b is None else b))

    sharded = f", 1/{plan.devices} each" if plan.strategy == "fsdp" else ""
    pdt = "fp32" if PRECISION_BYTES[plan.precision][0] == 4 else "16-bit"
    what = plan.config + (f"  (stage {plan.stage})" if plan.stage else "")
    out = [
        f"memory plan   {what}",
        f"model         {plan.params_total / 1e9:.2f}B parameters, {plan.params_trainable / 1e6:.2f}M trainable",
        f"setting       {plan.accelerator}, {plan.strategy} over {plan.devices} device(s) "
        f"({plan.processes_per_node} per node), {plan.precision}",
        f"step          {plan.batch_size} x {plan.seq_len:,} tokens per device, {plan.images_per_sample} image(s) "
        f"per sample x {plan.image_tokens} tokens"
        + (f", {plan.image_views} encoder views each" if plan.image_views > 1 else ""),
    ]
    if plan.image_assumption:
        out.append(f"images        {plan.image_assumption}")
    out += [
        "",
        row("training, per device", "no checkpoint.", "checkpointing"),
        both("  parameters", plan.params),
        f"    {plan.param_layout}",
    ]
    if plan.weight_copies:
        label = "all-gathered units, gradient buffer" if plan.strategy == "fsdp" else "16-bit weight copies"
        out.append(both(f"  {label}", plan.weight_copies))
    out.append(both(f"  gradients ({pdt}{sharded})", plan.grads))
    if plan.grad_buckets:
        out.append(both("  DDP gradient buckets", plan.grad_buckets))
    out.append(both(f"  optimizer (AdamW, 2 x {pdt}{sharded})", plan.optimizer))
    out.append(both("  activations saved for backward", plan.activations, plan.activations_checkpointed))
    for part in plan.parts:
        if part.kind == "head":
            label = "final norm, head, log-softmax"
        elif part.kind in ("connector", "pooler"):
            label = part.kind
        elif part.kind == "encoder":
            label = f"encoder ({part.count} blocks)"
        else:
            label = f"{part.kind} ({part.count} layer{'s' if part.count != 1 else ''})"
        out.append(row(f"    {label}", gb(part.bytes), ""))
    out.append(both("  loss working set (logits, fp32 copy)", plan.loss_working_set))
    if plan.encoder_forward:
        out.append(both("  frozen encoder forward (runs first, alone)", plan.encoder_forward))
    out.append(both("  peak", plan.train_peak_no_checkpointing, plan.train_peak_checkpointing))
    configured = ("", "<- config") if plan.activation_checkpointing else ("<- config", "")
    if plan.activation_checkpointing not in (True, False):
        configured = ("", f"<- config ({', '.join(plan.activation_checkpointing)})")
    if plan.device_memory is not None and plan.accelerator == "cuda":
        verdicts = [
            "fits" if p <= plan.device_memory else "does NOT fit"
            for p in (plan.train_peak_no_checkpointing, plan.train_peak_checkpointing)
        ]
        out.append(row(f"  device {gb(plan.device_memory)}", *verdicts))
    out.append(row("", *configured))
    out.append(
        f"  step FLOPs per token: {plan.flops_per_token:.3e} (model FLOPs, forward + backward; checkpointing "
        "recomputes the layers' forward on top)"
    )
    weights = {1: "8-bit", 2: "16-bit", 4: "fp32"}.get(
        plan.inference_weights // max(plan.params_total, 1), ""
    )
    out += [
        "",
        f"inference, one device, batch {plan.inference_batch}, context {plan.inference_context:,} tokens",
        row(f"  weights ({weights}, whole model)", gb(plan.inference_weights)),
        row("  KV cache (attention layers)", gb(plan.kv_cache)),
        row("  conv + SSM state (Mamba layers)", gb(plan.ssm_state)),
        row("  prefill working set", gb(plan.prefill_working_set)),
        row("  peak", gb(plan.inference_peak)),
    ]
    if plan.device_memory is not None and plan.accelerator == "cuda":
        fits = plan.inference_peak <= plan.device_memory
        out.append(row(f"  device {gb(plan.device_memory)}", "fits" if fits else "does NOT fit"))
    out += ["", "host, per node"]
    if plan.accelerator == "cuda":
        what = (
            "encoder (init: meta)"
            if plan.host_build < plan.processes_per_node * plan.params_total * F32
            else "model"
        )
        out.append(
            row(f"  {plan.processes_per_node} process(es) building the fp32 {what}", gb(plan.host_build))
        )
    else:
        out.append(row(f"  {plan.processes_per_node} process(es) x the training peak", gb(plan.host_peak)))
    if plan.host_memory is not None:
        fits = plan.host_peak <= plan.host_memory
        out.append(row(f"  available {gb(plan.host_memory)}", "fits" if fits else "does NOT fit"))
    if plan.accelerator == "cuda" and plan.device_memory is not None and plan.train_peak > plan.device_memory:
        out += ["", f"to train on {gb(plan.device_memory)} devices: {suggestions(plan, plan.device_memory)}"]
    if plan.host_memory is not None and plan.host_peak > plan.host_memory:
        out += [
            "",
            f"to fit the host's {gb(plan.host_memory)}: {suggestions(plan, plan.host_memory, 'host')}",
        ]
    out += [f"note: {note}" for note in plan.notes]
    return "\n".join(out)


def plan_json(plan: MemoryPlan) -> str:
    return plan.to_json()


__all__: Sequence[str] = (
    "MemoryPlan",
    "Part",
    "available_host_bytes",
    "check_fits",
    "device_memory_bytes",
    "estimate",
    "fits",
    "format_plan",
    "parse_memory",
    "plan_json",
    "preflight",
    "problems",
)
