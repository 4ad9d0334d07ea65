"""Causal self-attention mixer: grouped-query heads, RoPE (with scaling) or no positions, a KV cache.

Layout and parameter names follow Llama/Jamba (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) so weights map
one to one. ``pos_emb: none`` is Jamba's choice (the Mamba layers carry position); ``rope_scaling`` is the RoPE
scaling factor. With ``rope_type: linear`` (the default) it divides positions by the factor, the linear RoPE
scaling LLaVA-NeXT-Video uses to double the usable context; ``llama3`` (Llama 3.1) and ``yarn`` (Peng et al.,
arXiv 2309.00071) rescale the frequencies band by band, reading their extra numbers from ``rope_params``
exactly as transformers' ``modeling_rope_utils`` does. ``qkv_bias`` gives q/k/v (not o) a bias, as Qwen2 has;
``sliding_window`` limits each query to the last ``sliding_window`` keys (Mistral).

Left padding (batched generation of prompts of different lengths): ``KVCache.pad`` holds each row's number of
padding positions; their keys are masked for every query, and RoPE positions count from the row's first real
token, so each row computes what it would alone. A padded query sees only its own key (a fully masked row would
make NaNs that later layers would carry).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.registry import register


@dataclass
class KVCache:
    """Keys/values for ``max_len`` positions; ``length`` of them are filled."""

    k: Tensor  # [B, n_kv_heads, max_len, head_dim]
    v: Tensor  # [B, n_kv_heads, max_len, head_dim]
    length: int = 0
    pad: Tensor | None = None  # [B] left-padding positions of each row (None: no padding)


ROPE_TYPES = ("linear", "llama3", "yarn")
# the extra numbers each scaled RoPE reads from ``rope_params`` (as transformers' rope_parameters spells them)
ROPE_PARAMS = {
    "linear": {},
    "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {
        "original_max_position_embeddings": None,  # required
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "attention_factor": None,
        "mscale": None,
        "mscale_all_dim": None,
        "truncate": True,
    },
}


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, scaling: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [L, head_dim] for (possibly scaled) integer positions."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    freqs = torch.outer(positions.float() / scaling, inv_freq)  # [L, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def scaled_inv_freq(
    head_dim: int, theta: float, factor: float, rope_type: str, params: Mapping[str, float | None]
) -> tuple[Tensor, float]:
    """(inverse frequencies [head_dim/2], attention factor) of the ``llama3`` and ``yarn`` RoPE variants.

    The same formulas as transformers' ``_compute_llama3_parameters`` / ``_compute_yarn_parameters``; the
    attention factor multiplies cos and sin (1.0 for llama3).
    """
    cpu = torch.device("cpu")  # computed once at construction, also under a meta default device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=cpu) / head_dim))
    if rope_type == "llama3":
        old_len = float(params["original_max_position_embeddings"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are divided by the factor, short ones kept, the band between interpolated
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate low frequencies, extrapolate high ones, with a linear ramp between
    old_len = float(params["original_max_position_embeddings"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    lo, hi = correction_dim(float(params["beta_fast"])), correction_dim(float(params["beta_slow"]))
    if params.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=cpu) - lo) / (hi - lo)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (GPT-NeoX/Llama convention). x: [B, H, L, D]; cos/sin: [L, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@register("mixer", "attention", symbol="*")
class Attention(nn.Module):
    """Multi-head causal attention with grouped-query KV heads (Ainslie et al., 2023) via SDPA."""

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        n_heads: int = 8,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        pos_emb: str = "rope",
        rope_theta: float = 10000.0,
        rope_scaling: float = 1.0,
        bias: bool = False,
        rope_type: str = "linear",
        rope_params: dict[str, float | int | bool | None] | None = None,
        qkv_bias: bool = False,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if n_heads < 1 or (n_kv_heads is not None and n_kv_heads < 1):
            raise ValueError(f"n_heads ({n_heads}) and n_kv_heads ({n_kv_heads}) must be >= 1")
        if head_dim is None and (n_heads > d_model or d_model % n_heads):
            raise ValueError(
                f"d_model ({d_model}) does not split into n_heads ({n_heads}) heads: d_model / n_heads = "
                f"{d_model / n_heads:g}; use an n_heads that divides d_model, or set head_dim explicitly"
            )
        if head_dim is not None and head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        n_kv_heads = n_kv_heads or n_heads
        head_dim = head_dim or d_model // n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if pos_emb not in ("rope", "none"):
            raise ValueError(f"pos_emb must be 'rope' or 'none', got {pos_emb!r}")
        if head_dim % 2 and pos_emb == "rope":
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if rope_scaling <= 0:
            raise ValueError(f"rope_scaling must be > 0, got {rope_scaling}")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}")
        unknown = sorted(set(rope_params or {}) - set(ROPE_PARAMS[rope_type]))
        if unknown:
            allowed = ", ".join(ROPE_PARAMS[rope_type]) or "none"
            raise ValueError(f"rope_params {unknown} unknown for rope_type {rope_type!r}; allowed: {allowed}")
        params = {**ROPE_PARAMS[rope_type], **(rope_params or {})}
        if rope_type == "yarn" and params["original_max_position_embeddings"] is None:
            raise ValueError("rope_type 'yarn' needs rope_params.original_max_position_embeddings")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.pos_emb, self.rope_theta, self.rope_scaling = pos_emb, rope_theta, rope_scaling
        self.rope_type, self.rope_params, self.sliding_window = rope_type, params, sliding_window
        # llama3 / yarn: the scaled frequencies and the cos/sin factor, a small CPU table computed once
        self._inv_freq = (
            None
            if rope_type == "linear"
            else scaled_inv_freq(head_dim, rope_theta, rope_scaling, rope_type, params)
        )
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias or qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias or qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias or qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def allocate_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        device = device or self.q_proj.weight.device
        dtype = dtype or self.q_proj.weight.dtype
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        )

    def flops_per_token(self, seq_len: float) -> float:
        """Forward FLOPs per token of the scores and the weighted sum (QK^T, AV) over ``seq_len`` positions.

        2 * 2 * n_heads * head_dim * seq_len, with no causal discount (PaLM's MFU convention); the projections
        are counted from the parameters by ``toolkit.perf.FlopsModel``.
        """
        return 4.0 * self.n_heads * self.head_dim * seq_len

    def _cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin tables [L, head_dim] at ``positions`` for this layer's RoPE variant."""
        if self._inv_freq is None:
            return rope_cos_sin(positions, self.head_dim, self.rope_theta, self.rope_scaling, dtype)
        inv_freq, factor = self._inv_freq
        freqs = torch.outer(positions.float(), inv_freq.to(positions.device))  # [L, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)

    def forward(self, x: Tensor, state: KVCache | None = None) -> Tensor:
        """x: [B, L, d_model] -> [B, L, d_model]; with ``state``, attend to the cached past and append to it."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        past = state.length if state is not None else 0
        pad = state.pad if state is not None else None  # [B] or None
        if self.pos_emb == "rope":
            positions = torch.arange(past, past + L, device=x.device)
            if pad is None:
                cos, sin = self._cos_sin(positions, q.dtype)  # [L, D]
            else:  # each row's positions start at its first real token: [B, 1, L, D]
                cos, sin = self._cos_sin((positions - pad[:, None]).flatten(), q.dtype)
                cos, sin = cos.view(B, 1, L, -1), sin.view(B, 1, L, -1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if state is not None:
            if past + L > state.k.shape[2]:
                raise RuntimeError(f"KV cache holds {state.k.shape[2]} positions; {past + L} requested")
            state.k[:, :, past : past + L] = k
            state.v[:, :, past : past + L] = v
            state.length = past + L
            k, v = state.k[:, :, : past + L], state.v[:, :, : past + L]
            if past > 0:  # queries at positions past..past+L-1 see keys 0..their own position
                causal = False
                if L > 1:
                    mask = torch.ones(L, past + L, dtype=torch.bool, device=x.device).tril(diagonal=past)
        if self.sliding_window is not None and past + L > self.sliding_window:
            # query at position p sees keys p - window < j <= p (transformers' sliding-window causal mask)
            offset = torch.arange(past, past + L, device=x.device)[:, None] - torch.arange(
                past + L, device=x.device
            )
            mask, causal = (offset >= 0) & (offset < self.sliding_window), False  # [L, past + L]
        if pad is not None:
            keys = torch.arange(past + L, device=x.device)[None, :]  # [1, past + L]
            queries = torch.arange(past, past + L, device=x.device)[:, None]  # [L, 1]
            if mask is None:  # causal (or, for one query, everything so far) as an explicit mask
                mask = keys <= queries  # [L, past + L]
            own = keys == queries
            real = (keys >= pad[:, None])[:, None, :]  # [B, 1, past + L]
            mask, causal = (mask & (real | own)).unsqueeze(1), False  # [B, 1, L, past + L]
        if self.n_kv_heads != self.n_heads:  # expand KV heads (portable across torch versions and backends)
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))
