"""Mamba-1 selective scan in PyTorch, with a hand-written backward: the math of ``mamba_ssm``'s
``selective_scan_fn`` (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv 2312.00752; reference code github.com/state-spaces/mamba, ``selective_scan_ref``).

``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, ``y_t = C_t h_t + D u_t``, exact, with fp32 accumulation. Time is
cut into blocks of ``SCAN_BLOCK`` steps; a block's decays and inputs are built in one shot (they stay in cache),
the recurrence runs as in-place updates over the block, and the backward runs the reverse recurrence the same
way, recomputing each block from its saved boundary state. Nothing writes into a full-length tensor per step,
so the backward stays linear in L (transformers' slow path does not: its per-step indexing makes autograd
write a full-size gradient at every step) and the memory kept for the backward is one state per block instead
of one per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SCAN_BLOCK = 32  # Mamba-1 time block on CPU (measured at D=512, N=16: 16-32 fastest; 128 is 1.4x slower)
# Log-decays below this are raised to it before exp(): exp(-80) = 1.8e-35 is still a normal float, whereas
# exp(x < -87) yields denormals, which x86 CPUs compute ~35x slower (measured). The change is far below fp32
# resolution (a weight of 1e-35 instead of a smaller one).
EXP_FLOOR = -80.0


def _scan_block(dA: Tensor, Hb: Tensor, h: Tensor) -> Tensor:
    """In place over the block: Hb[:, t] += dA[:, t] * H[:, t-1] (H[:, -1] = h). Returns the last state."""
    for a_t, h_t in zip(dA.unbind(1), Hb.unbind(1)):
        h_t.addcmul_(a_t, h)
        h = h_t
    return h


def _decay(delta: Tensor, At: Tensor, out: Tensor, floor: bool) -> Tensor:
    """exp(delta A) for a block: delta [B, T, D], At [N, D] -> ``out`` [B, T, N, D]."""
    torch.mul(delta.unsqueeze(2), At, out=out)
    if floor:
        out.clamp_(min=EXP_FLOOR)
    return out.exp_()


class _SelectiveScan(torch.autograd.Function):
    """y[b,t,d] = sum_n C[b,t,n] h[b,t,n,d],  h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,  h_{-1} = h0.

    All fp32. u, delta: [B, L, D]; At (= A transposed): [N, D]; Bm, C: [B, L, N]; h0: [B, N, D]. Returns
    (y [B, L, D], h_L [B, N, D]). States are kept as [N, D] (D innermost): the per-step updates, the output
    contraction over N and the reductions of the backward are then all long contiguous vector operations.
    """

    @staticmethod
    def forward(ctx, u, delta, At, Bm, C, h0, block, floor):  # noqa: D102
        batch, length, dim = u.shape
        du = delta * u
        y = torch.empty_like(u, memory_format=torch.contiguous_format)
        T = min(block, length)
        dA_buf = u.new_empty(batch, T, At.shape[0], dim)  # block buffers, reused (no allocation per block)
        H_buf = torch.empty_like(dA_buf)
        boundaries = []  # state entering each block, kept for the backward (the only O(state) memory)
        h = h0
        for s in range(0, length, block):
            e = min(s + block, length)
            boundaries.append(h)
            dA = _decay(delta[:, s:e], At, dA_buf[:, : e - s], floor)  # [B, T, N, D]
            Hb = torch.mul(Bm[:, s:e].unsqueeze(-1), du[:, s:e].unsqueeze(2), out=H_buf[:, : e - s])
            h = _scan_block(dA, Hb, h).clone()  # Hb now holds the block's states
            torch.matmul(C[:, s:e].unsqueeze(-2), Hb, out=y[:, s:e].unsqueeze(-2))
        ctx.save_for_backward(u, delta, At, Bm, C, torch.stack(boundaries, 1))
        ctx.block, ctx.floor = block, floor
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_last):  # noqa: D102
        u, delta, At, Bm, C, boundaries = ctx.saved_tensors
        block = ctx.block
        batch, length, dim = u.shape
        if dy is None:
            dy = torch.zeros_like(u)
        du = delta * u
        d_du, d_delta = torch.empty_like(u), torch.empty_like(delta)
        dB, dC = torch.empty_like(Bm), torch.empty_like(C)
        dAt = torch.zeros_like(At)
        T = min(block, length)
        dA_buf = u.new_empty(batch, T, At.shape[0], dim)
        H_buf, G_buf, tmp_buf = torch.empty_like(dA_buf), torch.empty_like(dA_buf), torch.empty_like(dA_buf)
        a_next, g_next = None, dh_last  # decay and state gradient of the first step of the following block
        starts = list(range(0, length, block))
        for i in reversed(range(len(starts))):
            s = starts[i]
            e = min(s + block, length)
            n = e - s
            h_in = boundaries[:, i]
            dA = _decay(delta[:, s:e], At, dA_buf[:, :n], ctx.floor)
            Hb = torch.mul(Bm[:, s:e].unsqueeze(-1), du[:, s:e].unsqueeze(2), out=H_buf[:, :n])
            _scan_block(dA, Hb, h_in)  # recompute the block's states from its boundary
            # dL/dh_t through y_t, then (below) through h_{t+1}
            G = torch.mul(C[:, s:e].unsqueeze(-1), dy[:, s:e].unsqueeze(2), out=G_buf[:, :n])
            Gs, As = G.unbind(1), dA.unbind(1)
            if g_next is not None:  # gradient arriving from the next block (or from the returned last state)
                if a_next is None:
                    Gs[-1].add_(g_next)
                else:
                    Gs[-1].addcmul_(a_next, g_next)
            for t in range(n - 2, -1, -1):  # reverse recurrence: g_t += exp(delta_{t+1} A) g_{t+1}
                Gs[t].addcmul_(As[t + 1], Gs[t + 1])
            a_next, g_next = As[0].clone(), Gs[0].clone()
            torch.matmul(dy[:, s:e].unsqueeze(-2), Hb.transpose(-1, -2), out=dC[:, s:e].unsqueeze(-2))
            torch.matmul(du[:, s:e].unsqueeze(-2), G.transpose(-1, -2), out=dB[:, s:e].unsqueeze(-2))
            torch.matmul(Bm[:, s:e].unsqueeze(-2), G, out=d_du[:, s:e].unsqueeze(-2))
            Q = G.mul_(dA)  # dL/d(delta_t A) = g_t * exp(delta_t A) * h_{t-1}
            Q[:, 1:].mul_(Hb[:, :-1])
            Q[:, 0].mul_(h_in)
            tmp = torch.mul(Q, At, out=tmp_buf[:, :n])
            torch.sum(tmp, 2, out=d_delta[:, s:e])
            tmp = torch.mul(Q, delta[:, s:e].unsqueeze(2), out=tmp_buf[:, :n])
            dAt += tmp.sum((0, 1))
        dh0 = a_next * g_next
        d_delta += d_du * u
        return d_du * delta, d_delta, dAt, dB, dC, dh0, None, None


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
    block: int = SCAN_BLOCK,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan in PyTorch: the math of ``mamba_ssm``'s ``selective_scan_fn``, sequence-major.

    Args:
        u: inputs [B, L, D]. delta: time steps [B, L, D] (before ``delta_bias``/softplus).
        A: [D, N] (negative). B, C: input-dependent [B, L, N]. D: skip [D]. z: gate [B, L, D] (y * silu(z)).
        initial_state: [B, D, N] state before the first step (zeros when None).
    Returns:
        y [B, L, D] in ``u``'s dtype, and the last state [B, D, N] (fp32) when ``return_last_state``.
    """
    dtype = u.dtype
    u32, delta = u.float().contiguous(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    delta = delta.contiguous()
    if initial_state is None:
        h0 = u32.new_zeros(u.shape[0], A.shape[1], u.shape[2])
    else:
        h0 = initial_state.float().transpose(1, 2).contiguous()
    At = A.float().t().contiguous()  # [N, D]
    # clamp the log-decays only when some can fall below EXP_FLOOR (never at mamba_ssm's initialisation)
    floor = bool(delta.max() * (-At).max() > -EXP_FLOOR) if delta.numel() else False
    B, C = B.float().contiguous(), C.float().contiguous()
    if u.shape[1] == 0:
        y, last = torch.zeros_like(u32), h0
    else:
        y, last = _SelectiveScan.apply(u32, delta, At, B, C, h0, block, floor)
    last = last.transpose(1, 2)  # [B, D, N]
    if D is not None:
        y = y + u32 * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, last) if return_last_state else y
