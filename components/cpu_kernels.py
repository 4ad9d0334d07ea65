"""CPU kernels compiled with numba (the optional extra ``cpu``): decoding steps and the inference scan.

Why: generation runs one token per step, and at one token a layer's arithmetic is tiny (d_model 128: ~0.1
MFLOP in a Mamba-1 mixer) while eager PyTorch pays 5-15 us per operation on a CPU: the Mamba-1 step's ~30
operations cost ~0.25 ms around a few microseconds of math, an MLP's six ~60 us, a norm and a residual ~25 us.
A kernel here runs half a decoder layer's step in one call (pre-norm, sub-layer, residual: Mamba-1's mixer,
SwiGLU; ``DecoderLayer`` asks a sub-layer for its ``residual_step``). The prefill's selective scan is one pass
per thread over its share of the channels, the decays computed in the vectorised loop (``scan``).

The PyTorch path stays the reference (the tests compare the two; results agree to fp32 rounding, not bitwise)
and runs whenever a kernel does not apply (the functions here return None or False): numba not installed,
``CHIMERA_NUMBA=0`` in the environment, a Mamba mixer with ``use_kernels`` other than ``auto``, an autograd
graph being built, a tensor that is not a plain fp32 CPU tensor, a norm other than ``nn.RMSNorm``, or more
than ``MAX_ROWS`` rows in a step (where PyTorch's matrix products win).
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

MAX_ROWS = 16  # rows (batch x tokens) up to which one kernel call beats PyTorch's matrix products

# module -> (anchor storage, extra key, the tensors (held: a view never outlives its memory), their numpy views)
_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernels, or None without numba or under ``CHIMERA_NUMBA=0`` (probed once)."""
    if os.environ.get("CHIMERA_NUMBA", "1") == "0":
        return None
    try:
        from components import _numba_kernels
    except ImportError:
        return None
    return _numba_kernels


def _plain_fp32(t: Tensor) -> bool:
    return type(t) in (Tensor, nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu"


def _rows(x: Tensor) -> bool:
    """x can go to a kernel: no autograd graph, a plain fp32 CPU tensor of at most ``MAX_ROWS`` rows."""
    return (
        not torch.is_grad_enabled()
        and not x.requires_grad
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and _plain_fp32(x)
        and kernels() is not None
    )


def _weights(
    owner: nn.Module, anchor: Tensor, extra: tuple[int, ...], gather: Callable[[], list[Tensor | int]]
) -> list[np.ndarray] | None:
    """numpy views of ``owner``'s weights (``gather()``; an int is a zero bias of that length), rebuilt when
    ``anchor`` (one of them) moved to other memory (``.to()``, ``.float()``, new parameters) or ``extra`` (ids of
    other objects the weights come from) changed; None when a weight is not a plain fp32 CPU tensor. In-place
    updates (an optimizer step, ``load_state_dict``) show through the views."""
    entry = _WEIGHTS.get(owner)
    ptr = anchor.data_ptr()
    if entry is None or entry[0] != ptr or entry[1] != extra:
        held = [torch.zeros(t) if isinstance(t, int) else t.detach() for t in gather()]
        views = [t.numpy() for t in held] if all(_plain_fp32(t) for t in held) else None
        entry = (ptr, extra, held, views)
        _WEIGHTS[owner] = entry
    return entry[3]


def _norm_eps(norm: nn.Module) -> float | None:
    """The epsilon of an ``nn.RMSNorm`` with a weight (as ``F.rms_norm`` uses it), else None (no kernel)."""
    if not isinstance(norm, nn.RMSNorm) or norm.weight is None:
        return None
    return float(norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps)


def mamba1_residual_step(
    mixer: nn.Module, norm: nn.Module, x: Tensor, conv_state: Tensor, ssm_state: Tensor
) -> Tensor | None:
    """``x + mixer(norm(x))`` for one token of a ``Mamba`` mixer (x [B, 1, d_model]), the states updated in
    place; None when the kernel does not apply."""
    eps = _norm_eps(norm)
    if eps is None or not (_rows(x) and _plain_fp32(conv_state) and _plain_fp32(ssm_state)):
        return None
    m = mixer
    a2 = m._decay_rates()  # A log2(e), recomputed by the mixer when A_log changes

    def gather() -> list[Tensor | int]:
        inner = (m.dt_layernorm, m.b_layernorm, m.c_layernorm) if m.inner_norms else ()
        return [
            norm.weight,
            m.in_proj.weight,
            m.in_proj.bias if m.in_proj.bias is not None else 2 * m.d_inner,
            m.conv1d.weight.view(m.d_inner, m.d_conv),
            m.conv1d.bias if m.conv1d.bias is not None else m.d_inner,
            m.x_proj.weight,
            m.dt_proj.weight,
            m.dt_proj.bias,
            a2,
            m.D,
            m.out_proj.weight,
            m.out_proj.bias if m.out_proj.bias is not None else m.d_model,
            *([n.weight for n in inner] or [0, 0, 0]),  # empty arrays: no inner norms
        ]

    w = _weights(m, m.in_proj.weight, (id(a2), id(norm)), gather)
    if w is None:
        return None
    rows = x.numpy()[:, 0]
    out = np.empty_like(rows)
    inner_eps = float(m.dt_layernorm.eps) if m.inner_norms else 0.0
    kernels().mamba1_step(
        rows, w[0], eps, w[1], w[2], conv_state.numpy(), *w[3:12], ssm_state.numpy(), out, *w[12:], inner_eps
    )
    return torch.from_numpy(out).unsqueeze(1)


def swiglu_residual_step(ffn: nn.Module, norm: nn.Module, x: Tensor) -> Tensor | None:
    """``x + ffn(norm(x))`` for a ``SwiGLU`` on a few rows (x [..., d_model]); None when the kernel does not
    apply."""
    eps = _norm_eps(norm)
    if eps is None or not _rows(x):
        return None
    gate, up, down = ffn.gate_proj, ffn.up_proj, ffn.down_proj

    def gather() -> list[Tensor | int]:
        d_ff, d_model = gate.weight.shape
        return [
            norm.weight,
            gate.weight,
            gate.bias if gate.bias is not None else d_ff,
            up.weight,
            up.bias if up.bias is not None else d_ff,
            down.weight,
            down.bias if down.bias is not None else d_model,
        ]

    w = _weights(ffn, gate.weight, (id(norm),), gather)
    if w is None:
        return None
    rows = x.numpy().reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    kernels().swiglu_step(rows, w[0], eps, *w[1:], out)
    return torch.from_numpy(out).view(x.shape)


@functools.cache
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """Worker threads for ``scan``, one pool per process (``pid``: a forked child never reuses its parent's pool,
    whose threads it does not have)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="chimera-scan")


def scan(
    delta: Tensor, du: Tensor, a2: Tensor, Bm: Tensor, C: Tensor, h: Tensor, y: Tensor, low: float
) -> bool:
    """The inference scan of ``selective_scan._scan_inference`` in one kernel pass per thread (its tensors as
    there: delta, du, y [B, L, D]; a2 [N, D]; Bm, C [B, L, N]; h [B, N, D], updated); False, having done
    nothing, when the kernel does not apply. The channels are split into ``torch.get_num_threads()`` ranges run
    side by side: the recurrence is sequential in time only, and the kernel holds no GIL, so there is no barrier
    until the end."""
    tensors = (delta, du, a2, Bm, C, h, y)
    if torch.is_grad_enabled() or not all(_plain_fp32(t) for t in tensors) or kernels() is None:
        return False
    arrays = [t.detach().numpy() for t in tensors]
    dim = delta.shape[-1]
    threads = max(1, min(torch.get_num_threads(), dim // 64))
    bounds = [dim * i // threads for i in range(threads + 1)]
    run, low = kernels().scan_channels, np.float32(low)  # a float64 bound would make the loop float64
    if threads == 1:
        run(*arrays, 0, dim, low)
        return True
    jobs = [_pool(threads, os.getpid()).submit(run, *arrays, a, b, low) for a, b in zip(bounds, bounds[1:])]
    for job in jobs:
        job.result()
    return True
