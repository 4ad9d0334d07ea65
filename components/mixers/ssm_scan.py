"""State-space scans in pure PyTorch, their sequential references, and lazy probing of the CUDA kernels.

Shared by the Mamba-1 mixer (``mamba.py``; Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces", arXiv 2312.00752) and the Mamba-2 mixer (``mamba2.py``; Dao & Gu, "Transformers are SSMs",
arXiv 2405.21060). Reference code: github.com/state-spaces/mamba (``selective_scan_ref``, ``ssd_minimal``).

Two CPU-friendly algorithms, both exact (same math as the kernels, fp32 accumulation):

- ``selective_scan`` (Mamba-1): ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, ``y_t = C_t h_t + D u_t``. Time is
  cut into blocks of ``SCAN_BLOCK`` steps; a block's decays and inputs are built in one shot (they stay in
  cache), the recurrence runs as in-place updates over the block, and a hand-written backward runs the
  reverse recurrence the same way, recomputing each block from its saved boundary state. Nothing writes into
  a full-length tensor per step, so the backward stays linear in L (transformers' slow path does not: its
  per-step indexing makes autograd write a full-size gradient at every step) and the memory kept for the
  backward is one state per block instead of one per step.
- ``ssd_chunked`` (Mamba-2, scalar decay per head): the chunked "state space dual" algorithm: within a chunk
  a masked (causal) matrix product, across chunks a short sequential recurrence over chunk states.

``selective_scan_ref`` and ``ssd_ref`` are plain per-step recurrences, kept for tests and ``chimera bench``.

The CUDA kernels (``mamba_ssm``, ``causal_conv1d``) are never imported when this module is imported: on a
CPU-only install ``import mamba_ssm`` fails, so ``mamba1_kernels()``/``mamba2_kernels()`` probe once, on first
need, and cache what they found.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.errors import ChimeraError

logger = logging.getLogger("chimera")

USE_KERNELS = ("auto", "always", "never")
INSTALL_HINT = "pip install 'chimera-toolkit[gpu]'"
SCAN_BLOCK = 32  # Mamba-1 time block on CPU (measured at D=512, N=16: 16-32 fastest; 128 is 1.4x slower)
SSD_CHUNK = 64  # Mamba-2 chunk on CPU (the GPU kernel's chunk_size is a separate, larger setting)
# Log-decays below this are raised to it before exp(): exp(-80) = 1.8e-35 is still a normal float, whereas
# exp(x < -87) yields denormals, which x86 CPUs compute ~35x slower (measured). The change is far below fp32
# resolution (a weight of 1e-35 instead of a smaller one).
EXP_FLOOR = -80.0


# ----------------------------------------------------------------------------------------------------------
# Decoding states
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SSMState:
    """Constant-size decoding state of one SSM mixer, updated in place by the mixer's forward.

    ``conv_state`` holds the last ``d_conv`` inputs of the causal convolution (oldest first); ``ssm_state``
    the recurrent state; ``seqlen_offset`` how many tokens have gone through it.
    """

    conv_state: Tensor
    ssm_state: Tensor
    seqlen_offset: int = 0

    @property
    def batch_size(self) -> int:
        return self.conv_state.shape[0]

    def reset(self) -> None:
        """Zero the state in place (reuse the buffers for a new sequence)."""
        self.conv_state.zero_()
        self.ssm_state.zero_()
        self.seqlen_offset = 0


# ----------------------------------------------------------------------------------------------------------
# Kernel probing
# ----------------------------------------------------------------------------------------------------------


def _try_import(module: str, names: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """Import ``names`` from ``module``; any failure (ImportError, missing CUDA extension, undefined symbol)
    becomes a reason string instead of an exception."""
    try:
        mod = importlib.import_module(module)
        return {n: getattr(mod, n) for n in names}, ""
    except Exception as exc:  # noqa: BLE001 - a broken compiled extension raises all sorts of errors
        return {}, f"{module} ({type(exc).__name__}: {exc})"


@functools.cache
def mamba1_kernels() -> tuple[SimpleNamespace | None, str]:
    """The Mamba-1 CUDA kernels, probed once: ``(functions, "")`` or ``(None, "what is missing")``.

    Needs ``mamba_ssm`` (selective scan) and ``causal_conv1d``; ``selective_state_update`` (Triton) is optional
    (the one-token step falls back to PyTorch without it).
    """
    found: dict[str, Any] = {}
    missing = []
    for module, names in (
        ("mamba_ssm.ops.selective_scan_interface", ("selective_scan_fn", "mamba_inner_fn")),
        ("causal_conv1d", ("causal_conv1d_fn", "causal_conv1d_update")),
    ):
        fns, why = _try_import(module, names)
        found.update(fns)
        if why:
            missing.append(why)
    if missing:
        return None, "; ".join(missing)
    fns, _ = _try_import("mamba_ssm.ops.triton.selective_state_update", ("selective_state_update",))
    found.setdefault("selective_state_update", fns.get("selective_state_update"))
    return SimpleNamespace(**found), ""


@functools.cache
def mamba2_kernels() -> tuple[SimpleNamespace | None, str]:
    """The Mamba-2 kernels, probed once: ``mamba_chunk_scan_combined`` (Triton, from ``mamba_ssm``) is required;
    ``causal_conv1d`` and ``selective_state_update`` are used when present."""
    fns, why = _try_import("mamba_ssm.ops.triton.ssd_combined", ("mamba_chunk_scan_combined",))
    if why:
        return None, why
    found = dict(fns)
    conv, _ = _try_import("causal_conv1d", ("causal_conv1d_fn", "causal_conv1d_update"))
    found["causal_conv1d_fn"] = conv.get("causal_conv1d_fn")
    found["causal_conv1d_update"] = conv.get("causal_conv1d_update")
    step, _ = _try_import("mamba_ssm.ops.triton.selective_state_update", ("selective_state_update",))
    found["selective_state_update"] = step.get("selective_state_update")
    return SimpleNamespace(**found), ""


def check_use_kernels(use_kernels: str, probe: Any, mixer: str) -> None:
    """Validate ``use_kernels`` at construction; ``"always"`` without the kernels fails here, naming the gap.

    ``"auto"`` and ``"never"`` import nothing (the probe runs on the first forward with CUDA tensors).
    """
    if use_kernels not in USE_KERNELS:
        raise ValueError(f"use_kernels must be one of {', '.join(USE_KERNELS)}; got {use_kernels!r}")
    if use_kernels == "always":
        kernels, missing = probe()
        if kernels is None:
            raise ChimeraError(
                f"{mixer}: use_kernels='always' but the CUDA kernels cannot be imported: {missing}. "
                f"Install them with `{INSTALL_HINT}` on a CUDA machine, or set use_kernels: auto"
            )


def select_kernels(use_kernels: str, probe: Any, x: Tensor, mixer: str) -> SimpleNamespace | None:
    """The kernels to use for this call, or None for the PyTorch path; logs the chosen path once."""
    kernels = None
    if use_kernels != "never" and x.is_cuda:
        kernels, _ = probe()
    elif use_kernels == "always":
        raise ChimeraError(f"{mixer}: use_kernels='always' needs CUDA tensors, got a tensor on {x.device}")
    log_path_once(mixer, "CUDA kernels (mamba_ssm)" if kernels is not None else f"PyTorch ({x.device.type})")
    return kernels


_LOGGED: set[tuple[str, str]] = set()


def log_path_once(mixer: str, path: str) -> None:
    if (mixer, path) not in _LOGGED:
        _LOGGED.add((mixer, path))
        logger.info("%s mixer: using the %s path", mixer, path)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, prefix: Tensor | None = None) -> Tensor:
    """Depthwise causal convolution followed by SiLU (``causal_conv1d_fn(..., activation="silu")``).

    x: [B, C, L]; weight: [C, W]; prefix: [B, C, W-1], the inputs just before ``x`` (zeros when None).
    Returns [B, C, L].
    """
    width = weight.shape[-1]
    if prefix is None:
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    else:
        out = F.conv1d(
            torch.cat([prefix.to(x.dtype), x], dim=-1), weight.unsqueeze(1), bias, groups=x.shape[1]
        )
    return F.silu(out)


def conv_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One decoding step of ``causal_conv1d`` (``causal_conv1d_update``): shift ``x`` [B, C] into ``conv_state``
    [B, C, W] in place and return silu(conv) [B, C]."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = torch.einsum("bcw,cw->bc", conv_state.to(weight.dtype), weight)
    if bias is not None:
        out = out + bias
    return F.silu(out).to(x.dtype)


def last_inputs(x: Tensor, conv_state: Tensor) -> Tensor:
    """The last W inputs of ``conv_state`` followed by ``x`` ([B, C, L]): the conv state after ``x``."""
    width = conv_state.shape[-1]
    return torch.cat([conv_state.to(x.dtype), x], dim=-1)[..., -width:]


# ----------------------------------------------------------------------------------------------------------
# Mamba-1: blocked selective scan with a hand-written backward
# ----------------------------------------------------------------------------------------------------------


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


def selective_scan_ref(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential reference for ``selective_scan`` (same arguments): one recurrence step per token, computed in
    fp32 (or fp64 for fp64 inputs)."""
    dtype = u.dtype
    f = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = u.to(f), delta.to(f), A.to(f), B.to(f), C.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)
    if delta_softplus:
        delta = F.softplus(delta)
    h = initial_state.to(f) if initial_state is not None else u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for u_t, d_t, b_t, c_t in zip(u.unbind(1), delta.unbind(1), B.unbind(1), C.unbind(1)):
        h = torch.exp(d_t.unsqueeze(-1) * A) * h + (d_t * u_t).unsqueeze(-1) * b_t.unsqueeze(1)
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + u * D.to(f)
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(dtype)
    return (y, h) if return_last_state else y


# ----------------------------------------------------------------------------------------------------------
# Mamba-2: chunked SSD
# ----------------------------------------------------------------------------------------------------------


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
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 scan (scalar decay per head) as the chunked SSD algorithm: ``mamba_chunk_scan_combined``'s math.

    Recurrence: ``h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t`` per head h.

    Args:
        x: [B, L, H, P]. dt: [B, L, H] (before ``dt_bias``/softplus). A: [H] (negative).
        B, C: [B, L, G, N] with G groups (H divisible by G). D: [H] or [H, P].
        initial_state: [B, H, P, N].
    Returns:
        y [B, L, H, P] in ``x``'s dtype, and the final state [B, H, P, N] (fp32) when ``return_final_state``.
    """
    dtype = x.dtype
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    per_group = nheads // ngroups
    if length == 0:
        return ssd_ref(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, return_final_state)
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
    # layouts: [batch, chunk, group, head-in-group, time, ...]
    xdt = xdt.view(batch, nc, T, ngroups, per_group, headdim).permute(0, 1, 3, 4, 2, 5)  # [b,c,g,e,T,P]
    a_cs = a.view(batch, nc, T, ngroups, per_group).permute(0, 1, 3, 4, 2).cumsum(-1)  # [b,c,g,e,T]
    Bc = B.view(batch, nc, T, ngroups, dstate).transpose(2, 3).unsqueeze(3)  # [b,c,g,1,T,N]
    Cc = C.view(batch, nc, T, ngroups, dstate).transpose(2, 3).unsqueeze(3)  # [b,c,g,1,T,N]

    # 1. within each chunk: y_l = sum_{s<=l} C_l.B_s exp(a_cs[l] - a_cs[s]) xdt_s  (a causal masked product)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    seg = (a_cs.unsqueeze(-1) - a_cs.unsqueeze(-2)).clamp(EXP_FLOOR, 0.0)  # <= 0 on and below the diagonal
    decay = seg.exp().masked_fill(~causal, 0.0)  # [b,c,g,e,T,T]
    y = ((Cc @ Bc.transpose(-1, -2)) * decay) @ xdt  # [b,c,g,e,T,P]

    # 2. each chunk's own contribution to the state at its end
    to_end = (a_cs[..., -1:] - a_cs).clamp(min=EXP_FLOOR).exp().unsqueeze(-1)  # [b,c,g,e,T,1]
    chunk_states = (xdt * to_end).transpose(-1, -2) @ Bc  # [b,c,g,e,P,N]

    # 3. across chunks, sequentially: the state entering each chunk
    from_start = a_cs.clamp(min=EXP_FLOOR).exp()  # decay from the chunk's start [b,c,g,e,T]
    chunk_decay = from_start[..., -1]  # [b,c,g,e]
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


def ssd_ref(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential reference for ``ssd_chunked`` (same arguments): one recurrence step per token, computed in
    fp32 (or fp64 for fp64 inputs)."""
    dtype = x.dtype
    f = torch.promote_types(dtype, torch.float32)
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    x, dt, A = x.to(f), dt.to(f), A.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    B = B.to(f).repeat_interleave(nheads // ngroups, dim=2)  # [B, L, H, N]
    C = C.to(f).repeat_interleave(nheads // ngroups, dim=2)
    h = x.new_zeros(batch, nheads, headdim, dstate) if initial_state is None else initial_state.to(f)
    ys = []
    for x_t, dt_t, b_t, c_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        dA = torch.exp(dt_t * A)[..., None, None]  # [B, H, 1, 1]
        h = dA * h + (x_t * dt_t.unsqueeze(-1)).unsqueeze(-1) * b_t.unsqueeze(-2)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, c_t))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D.to(f).view(nheads, -1)
    y = y.to(dtype)
    return (y, h) if return_final_state else y
