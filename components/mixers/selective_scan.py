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

Without autograd (generation, evaluation: no input needs a gradient) ``selective_scan`` runs ``_scan_inference``
instead: the same recurrence and blocking, forward only, in longer blocks (``INFERENCE_BLOCK``), with the decays
computed as ``exp2(delta * A * log2(e))`` (``exp2`` is about 1.8x cheaper than ``exp`` on CPUs; the GPU kernels
use it too), no saved boundaries and no copies of its inputs, and its block loop on one CPU thread
(``_one_thread``: the block operations are too small to gain from OpenMP and stall at its barriers on a busy
machine). It agrees with the training path to fp32 rounding. With numba on a CPU the whole forward-only scan is
instead one compiled pass per thread over a share of the channels (``components.cpu_kernels.scan``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from components import cpu_kernels

SCAN_BLOCK = 32  # Mamba-1 time block on CPU (measured at D=512, N=16: 16-32 fastest; 128 is 1.4x slower)
# forward-only time block: no backward to keep in cache, fewer per-block operations (measured at D=256,
# N=16, L=4096-16384, one thread: 64 is fastest; 128-256 cost 1.1-1.2x, 512-1024 1.6x)
INFERENCE_BLOCK = 64
SERIAL_BLOCKS = True  # the inference block loop on one CPU thread (``_one_thread``)
LOG2E = 1.4426950408889634
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


def _scan_inference(
    u: Tensor, delta: Tensor, At: Tensor, Bm: Tensor, C: Tensor, h0: Tensor, block: int, floor: bool
) -> tuple[Tensor, Tensor]:
    """``_SelectiveScan.forward`` without autograd: y [B, L, D] and the last state [B, N, D] (fp32).

    u, delta: [B, L, D] fp32 (any strides); At: [N, D]; Bm, C: [B, L, N]; h0: [B, N, D]. Each block of ``block``
    steps builds its decays (``exp2``) and inputs into two reused buffers, runs the recurrence in place and
    contracts the states with C in one matmul. On a CPU with numba the whole scan is instead one kernel pass
    per thread over its share of the channels (``cpu_kernels.scan``; no buffers, no per-block operations).
    """
    batch, length, dim = u.shape
    du = delta * u  # [B, L, D]
    y = du.new_empty(batch, length, dim)
    At2 = At * LOG2E  # exp(delta A) = exp2(delta A log2 e)
    h = h0.clone()  # [B, N, D], the state carried from block to block
    if cpu_kernels.scan(delta, du, At2, Bm, C, h, y, EXP_FLOOR * LOG2E if floor else -126.0):
        return y, h
    T = min(block, length)
    dA_buf = du.new_empty(batch, T, At.shape[0], dim)
    H_buf = torch.empty_like(dA_buf)
    dA_steps, H_steps = list(dA_buf.unbind(1)), list(H_buf.unbind(1))  # per-step views, made once
    in_order = _foreach_in_order(u.device.type)
    with _one_thread(u.device):  # the block ops are small: see _one_thread
        for s in range(0, length, block):
            n = min(s + block, length) - s
            dA = torch.mul(delta[:, s : s + n].unsqueeze(2), At2, out=dA_buf[:, :n])  # [B, T, N, D]
            if floor:
                dA.clamp_(min=EXP_FLOOR * LOG2E)
            dA.exp2_()
            Hb = torch.mul(Bm[:, s : s + n].unsqueeze(-1), du[:, s : s + n].unsqueeze(2), out=H_buf[:, :n])
            H_steps[0].addcmul_(dA_steps[0], h)
            if in_order:  # the block's recurrence as one call: H[t] += dA[t] * H[t-1], t = 1 .. n-1, in order
                torch._foreach_addcmul_(H_steps[1:n], dA_steps[1:n], H_steps[: n - 1])
            else:
                for t in range(1, n):
                    H_steps[t].addcmul_(dA_steps[t], H_steps[t - 1])
            h.copy_(H_steps[n - 1])
            torch.matmul(C[:, s : s + n].unsqueeze(-2), Hb, out=y[:, s : s + n].unsqueeze(-2))
    return y, h


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run the inference scan's block loop on one intra-op thread (CPU; restored after; ``SERIAL_BLOCKS``).

    Each block operation touches about 1 MB (64 steps x d_state x d_inner) and takes ~0.1 ms on one core: too
    small for OpenMP. Split over threads, every operation ends at a barrier that waits for the slowest thread,
    and on a shared machine a descheduled thread stalls it for a scheduler slice. Measured (Mamba-1 scan,
    L 4096, d_inner 256, d_state 16, 2 cores at load ~6): 73-85 ms on one thread vs 81-480 ms on two. The
    operations outside the loop (projections, convolution, gating: whole-sequence tensors) keep every thread.
    """
    threads = torch.get_num_threads()
    if not SERIAL_BLOCKS or device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _foreach_in_order(device_type: str) -> bool:
    """Whether ``torch._foreach_addcmul_`` applies its list elements one after the other on this device, so that
    a chain ``H[t] += dA[t] * H[t-1]`` over views of one buffer is the recurrence. On CPUs it does (ATen's CPU
    foreach ops are a loop over the list) and one call then replaces a Python loop of one operation per step
    (about 1.6x cheaper per step); probed once on a 3-step chain, so a torch that parallelises it falls back."""
    try:
        with torch.inference_mode(False), torch.no_grad():
            chain = list(torch.ones(3, 4, device=device_type).unbind(0))
            twos = [torch.full((4,), 2.0, device=device_type)] * 2
            torch._foreach_addcmul_(chain[1:], twos, chain[:-1])  # in order: 1 + 2 * (1 + 2 * 1) = 7
            return bool((chain[2] == 7.0).all())
    except Exception:  # noqa: BLE001 - an API change (e.g. an overlap check) means: use the loop
        return False


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
    block: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan in PyTorch: the math of ``mamba_ssm``'s ``selective_scan_fn``, sequence-major.

    Args:
        u: inputs [B, L, D]. delta: time steps [B, L, D] (before ``delta_bias``/softplus).
        A: [D, N] (negative). B, C: input-dependent [B, L, N]. D: skip [D]. z: gate [B, L, D] (y * silu(z)).
        initial_state: [B, D, N] state before the first step (zeros when None).
        block: time steps per block (None: ``SCAN_BLOCK`` when a gradient is needed, else ``INFERENCE_BLOCK``).
    Returns:
        y [B, L, D] in ``u``'s dtype, and the last state [B, D, N] (fp32) when ``return_last_state``.
    """
    dtype = u.dtype
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    u32, delta = (u.float().contiguous() if training else u.float()), delta.float()
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
    B, C = B.float(), C.float()
    if u.shape[1] == 0:
        y, last = torch.zeros_like(u32), h0
    elif training:
        block = block or SCAN_BLOCK
        y, last = _SelectiveScan.apply(u32, delta, At, B.contiguous(), C.contiguous(), h0, block, floor)
    else:
        y, last = _scan_inference(u32, delta, At, B, C, h0, block or INFERENCE_BLOCK, floor)
    last = last.transpose(1, 2)  # [B, D, N]
    if not training and u.shape[1] > 0:  # y is a fresh buffer: finish it in place
        if D is not None:
            y.addcmul_(u32, D.float())
        if z is not None:
            y.mul_(F.silu(z.float()))
        return (y.to(dtype), last) if return_last_state else y.to(dtype)
    if D is not None:
        y = y + u32 * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, last) if return_last_state else y
