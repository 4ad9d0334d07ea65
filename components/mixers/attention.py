"""Causal self-attention mixer: grouped-query heads, RoPE (with linear scaling) or no positions, a KV cache.

Layout and parameter names follow Llama/Jamba (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) so weights map
one to one. ``pos_emb: none`` is Jamba's choice (the Mamba layers carry position); ``rope_scaling`` divides
positions by a factor, the linear RoPE scaling LLaVA-NeXT-Video uses to double the usable context.
"""

from __future__ import annotations

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
    ) -> None:
        super().__init__()
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
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.pos_emb, self.rope_theta, self.rope_scaling = pos_emb, rope_theta, rope_scaling
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
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

    def forward(self, x: Tensor, state: KVCache | None = None) -> Tensor:
        """x: [B, L, d_model] -> [B, L, d_model]; with ``state``, attend to the cached past and append to it."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        past = state.length if state is not None else 0
        if self.pos_emb == "rope":
            positions = torch.arange(past, past + L, device=x.device)
            cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, self.rope_scaling, q.dtype)
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
        if self.n_kv_heads != self.n_heads:  # expand KV heads (portable across torch versions and backends)
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))
