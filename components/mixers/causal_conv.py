"""Depthwise causal convolution + SiLU in PyTorch: the math of ``causal_conv1d``'s ``causal_conv1d_fn`` and
``causal_conv1d_update`` (github.com/Dao-AILab/causal-conv1d), used by both Mamba mixers on their CPU path."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    prefix: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> Tensor:
    """Depthwise causal convolution followed by SiLU (``causal_conv1d_fn(..., activation="silu")``).

    x: [B, C, L]; weight: [C, W]; prefix: [B, C, W-1], the inputs just before ``x`` (zeros when None).
    seq_idx: [B, L] integers, the packed sequence each position belongs to: an output sees only inputs of its
    own sequence (``causal_conv1d_fn``'s ``seq_idx``; not combined with ``prefix``, as there).
    Returns [B, C, L].
    """
    width = weight.shape[-1]
    if seq_idx is not None:
        if prefix is not None:
            raise ValueError("causal_conv1d: seq_idx and prefix (initial states) cannot be combined")
        length, f = x.shape[-1], torch.promote_types(x.dtype, torch.float32)  # accumulate in fp32 at least
        xp = F.pad(x.to(f), (width - 1, 0))
        sp = F.pad(seq_idx, (width - 1, 0), value=-1)  # -1: no sequence (the zero padding)
        out = xp.new_zeros(x.shape) if bias is None else bias.to(f)[:, None].expand(x.shape)
        for k in range(width):  # tap k reads position t - (width - 1) + k
            same = (sp[:, k : k + length] == seq_idx).unsqueeze(1)  # [B, 1, L]
            out = out + weight[:, k, None].to(f) * xp[..., k : k + length] * same
        return F.silu(out).to(x.dtype)
    if prefix is None:
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    else:
        out = F.conv1d(
            torch.cat([prefix.to(x.dtype), x], dim=-1), weight.unsqueeze(1), bias, groups=x.shape[1]
        )
    return F.silu(out)


def causal_conv1d_seq(x: Tensor, weight: Tensor, bias: Tensor | None, prefix: Tensor | None = None) -> Tensor:
    """``causal_conv1d`` (with SiLU) in sequence-major layout, for inference: x [B, L, C] (any strides, e.g. a
    slice of in_proj's output) -> [B, L, C] contiguous; prefix [B, C, W-1] as in ``causal_conv1d``.

    W shifted multiply-adds over one padded copy of x: on CPUs about 3x cheaper than ``F.conv1d`` on the
    transposed input followed by the copy back to [B, L, C] (depthwise convolutions are slow there).
    """
    batch, length, channels = x.shape
    width = weight.shape[-1]
    xp = x.new_empty(batch, length + width - 1, channels)
    if prefix is None:
        xp[:, : width - 1].zero_()
    else:
        xp[:, : width - 1].copy_(prefix.transpose(1, 2))
    xp[:, width - 1 :].copy_(x)
    w = weight.t().to(x.dtype)  # [W, C]
    last = xp[:, width - 1 :]
    out = last * w[-1] if bias is None else torch.addcmul(bias.to(x.dtype), last, w[-1])
    for k in range(width - 1):  # tap k reads position t - (width - 1) + k
        out.addcmul_(xp[:, k : k + length], w[k])
    return F.silu(out, inplace=True)


@functools.lru_cache(maxsize=32)
def _shift_left(width: int, device: torch.device) -> Tensor:
    """[1, 2, ..., width - 1, 0]: the indices that shift a conv state by one position (cheaper than roll)."""
    with torch.inference_mode(False):  # a normal tensor, whatever mode the first call runs in
        return torch.arange(1, width + 1, device=device) % width


def conv_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One decoding step of ``causal_conv1d`` (``causal_conv1d_update``): shift ``x`` [B, C] into ``conv_state``
    [B, C, W] in place and return silu(conv) [B, C]."""
    conv_state.copy_(conv_state.index_select(-1, _shift_left(conv_state.shape[-1], conv_state.device)))
    conv_state.select(-1, -1).copy_(x)
    # [B, C]; an einsum costs 2-3x more per token
    out = torch.mul(conv_state.to(weight.dtype), weight).sum(-1)
    if bias is not None:
        out = out.add_(bias)
    return F.silu(out, inplace=True).to(x.dtype)


def last_inputs(x: Tensor, conv_state: Tensor) -> Tensor:
    """The last W inputs of ``conv_state`` followed by ``x`` ([B, C, L]): the conv state after ``x``."""
    width = conv_state.shape[-1]
    return torch.cat([conv_state.to(x.dtype), x[..., -width:]], dim=-1)[..., -width:]  # not the whole of x
