"""Mamba-2 scan (scalar decay per head) in PyTorch as the chunked "state space dual" algorithm: the math of
``mamba_ssm``'s ``mamba_chunk_scan_combined`` (Dao & Gu, "Transformers are SSMs", arXiv 2405.21060; reference
code github.com/state-spaces/mamba, ``ssd_minimal``).

Within a chunk the scan is a masked (causal) matrix product; across chunks a short sequential recurrence over
chunk states. Exact (same math as the kernel), with fp32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from components.mixers.selective_scan import EXP_FLOOR

SSD_CHUNK = 64  # Mamba-2 chunk on CPU (the GPU kernel's chunk_size is a separate, larger setting)


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = SSD_CHUNK,
    seq_idx: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 scan (scalar decay per head) as the chunked SSD algorithm: ``mamba_chunk_scan_combined``'s math.

    Recurrence: ``h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t`` per head h.

    Args:
        x: [B, L, H, P]. dt: [B, L, H] (before ``dt_bias``/softplus). A: [H] (negative).
        B, C: [B, L, G, N] with G groups (H divisible by G). D: [H] or [H, P].
        initial_state: [B, H, P, N].
        seq_idx: [B, L] integers, non-decreasing from 0: the packed sequence of each position. The state is
            not carried across a change of sequence, with ``mamba_chunk_scan_combined``'s semantics:
            ``initial_state`` feeds sequence 0 only, and the final state is that of the last sequence.
    Returns:
        y [B, L, H, P] in ``x``'s dtype, and the final state [B, H, P, N] (fp32) when ``return_final_state``.
    """
    dtype = x.dtype
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    per_group = nheads // ngroups
    if length == 0:  # nothing to scan: an empty output, and the state passes through
        y = torch.zeros_like(x)
        if initial_state is None:
            h = x.new_zeros(batch, nheads, headdim, dstate, dtype=torch.float32)
        else:
            h = initial_state.float()
        return (y, h) if return_final_state else y
    x32, dt, B, C, A = x.float(), dt.float(), B.float(), C.float(), A.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    T = max(1, min(chunk_size, length))
    pad = (-length) % T  # zero padding at the end: dt = 0 there, so the state passes through unchanged
    xdt = x32 * dt.unsqueeze(-1)
    a = dt * A  # log decay per step [B, L, H], <= 0
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = (length + pad) // T
    if seq_idx is not None:  # padding belongs to the last sequence (dt = 0 there: nothing changes)
        sidx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], 1) if pad else seq_idx
        sidx = sidx.view(batch, nc, T)
    # layouts: [batch, chunk, group, head-in-group, time, ...]
    xdt = xdt.view(batch, nc, T, ngroups, per_group, headdim).permute(0, 1, 3, 4, 2, 5)  # [b,c,g,e,T,P]
    a_cs = a.view(batch, nc, T, ngroups, per_group).permute(0, 1, 3, 4, 2).cumsum(-1)  # [b,c,g,e,T]
    Bc = B.view(batch, nc, T, ngroups, dstate).transpose(2, 3).unsqueeze(3)  # [b,c,g,1,T,N]
    Cc = C.view(batch, nc, T, ngroups, dstate).transpose(2, 3).unsqueeze(3)  # [b,c,g,1,T,N]

    # 1. within each chunk: y_l = sum_{s<=l} C_l.B_s exp(a_cs[l] - a_cs[s]) xdt_s  (a causal masked product)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    seg = (a_cs.unsqueeze(-1) - a_cs.unsqueeze(-2)).clamp(EXP_FLOOR, 0.0)  # <= 0 on and below the diagonal
    decay = seg.exp().masked_fill(~causal, 0.0)  # [b,c,g,e,T,T]
    if seq_idx is not None:  # only positions of the same sequence interact
        decay = decay * (sidx.unsqueeze(-1) == sidx.unsqueeze(-2))[:, :, None, None]
    y = ((Cc @ Bc.transpose(-1, -2)) * decay) @ xdt  # [b,c,g,e,T,P]

    # 2. each chunk's own contribution to the state at its end
    to_end = (a_cs[..., -1:] - a_cs).clamp(min=EXP_FLOOR).exp().unsqueeze(-1)  # [b,c,g,e,T,1]
    if seq_idx is not None:  # only the sequence the chunk ends in reaches the chunk's end state
        end = sidx[..., -1]  # [b, c]
        to_end = to_end * (sidx == end.unsqueeze(-1))[:, :, None, None, :, None]
    chunk_states = (xdt * to_end).transpose(-1, -2) @ Bc  # [b,c,g,e,P,N]

    # 3. across chunks, sequentially: the state entering each chunk
    from_start = a_cs.clamp(min=EXP_FLOOR).exp()  # decay from the chunk's start [b,c,g,e,T]
    chunk_decay = from_start[..., -1]  # [b,c,g,e]
    if seq_idx is not None:
        # the sequence before each chunk (0 before the first: the initial state belongs to sequence 0); the
        # state passes a chunk only when the chunk ends in that sequence, and reaches only its positions
        prev_end = F.pad(end[:, :-1], (1, 0))  # [b, c]
        chunk_decay = chunk_decay * (end == prev_end)[:, :, None, None]
        from_start = from_start * (sidx == prev_end.unsqueeze(-1))[:, :, None, None, :]
    if initial_state is None:
        h = chunk_states.new_zeros(batch, ngroups, per_group, headdim, dstate)
    else:
        h = initial_state.float().reshape(batch, ngroups, per_group, headdim, dstate)
    entering = []
    for st, dc in zip(chunk_states.unbind(1), chunk_decay.unbind(1)):
        entering.append(h)
        h = torch.addcmul(st, dc[..., None, None], h)
    entering = torch.stack(entering, 1)  # [b,c,g,e,P,N]

    # 4. the entering state's contribution inside each chunk
    y = y + (Cc @ entering.transpose(-1, -2)) * from_start.unsqueeze(-1)
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(batch, nc * T, nheads, headdim)[:, :length]
    if D is not None:
        y = y + x32 * D.float().view(nheads, -1)  # D: [H] or [H, P]
    y = y.to(dtype)
    return (y, h.reshape(batch, nheads, headdim, dstate)) if return_final_state else y
