"""The numba kernels behind ``components.cpu_kernels`` (imported only through its probe: this module imports
numba).

Each kernel is the math of the PyTorch path it replaces, in fp32, states updated in place: half a decoder layer's
one-token step over a batch of rows (pre-norm, sub-layer, residual), or the inference scan over a range of
channels. Reductions run in fastmath order, so results agree with the PyTorch path to ~1e-6, not bitwise.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _dot(w, v):  # pragma: no cover - compiled
    """sum(w * v) over two 1-D arrays (a vectorised reduction under fastmath)."""
    s = np.float32(0.0)
    for i in range(v.shape[0]):
        s += w[i] * v[i]
    return s


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _silu(x):  # pragma: no cover - compiled
    return x / (np.float32(1.0) + math.exp(-x))


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _normed(v, w, eps, out):  # pragma: no cover - compiled
    """out = v * rsqrt(mean(v^2) + eps) * w (``F.rms_norm``; ``out`` may be ``v``)."""
    scale = np.float32(1.0) / math.sqrt(_dot(v, v) / v.shape[0] + eps)
    for i in range(v.shape[0]):
        out[i] = v[i] * scale * w[i]


@numba.njit(fastmath=True, cache=True, nogil=True)
def mamba1_step(
    x,
    norm_w,
    norm_eps,
    in_w,
    in_b,
    conv_state,
    conv_w,
    conv_b,
    x_w,
    dt_w,
    dt_b,
    a2,
    d,
    out_w,
    out_b,
    ssm,
    out,
    dt_norm,
    b_norm,
    c_norm,
    eps,
):  # pragma: no cover - compiled
    """A decoder layer's mixer half for rows x [B, d_model]: out = x + mamba(rms_norm(x) * norm_w), the mixer
    being Mamba-1's ``_step_torch``.

    in_w [2E, d_model] (xs then z), conv_state [B, E, W] (oldest first), conv_w [E, W], x_w [R + 2N, E] (dt, B,
    C), dt_w [E, R], a2 = A log2(e) [E, N], ssm [B, E, N]; ``dt_norm``, ``b_norm``, ``c_norm``: Jamba's inner
    RMSNorm weights ([R], [N], [N]; empty arrays without inner norms). Loops over 1-D rows, which vectorise.
    """
    inner = in_w.shape[0] // 2
    width = conv_w.shape[1]
    rank = dt_w.shape[1]
    n_state = a2.shape[1]
    xz = np.empty(2 * inner, np.float32)
    u = np.empty(inner, np.float32)
    y = np.empty(inner, np.float32)
    dbc = np.empty(x_w.shape[0], np.float32)
    xb = np.empty(x.shape[1], np.float32)
    for b in range(x.shape[0]):
        _normed(x[b], norm_w, norm_eps, xb)
        window, state = conv_state[b], ssm[b]
        for k in range(2 * inner):  # in_proj
            xz[k] = in_b[k] + _dot(in_w[k], xb)
        for c in range(inner):  # shift xs into the conv window; depthwise conv + SiLU
            wc = window[c]
            for w in range(width - 1):
                wc[w] = wc[w + 1]
            wc[width - 1] = xz[c]
            u[c] = _silu(conv_b[c] + _dot(conv_w[c], wc))
        for k in range(x_w.shape[0]):  # x_proj -> dt (low rank), B, C
            dbc[k] = _dot(x_w[k], u)
        if dt_norm.shape[0]:  # Jamba's inner norms, in place
            _normed(dbc[:rank], dt_norm, eps, dbc[:rank])
            _normed(dbc[rank : rank + n_state], b_norm, eps, dbc[rank : rank + n_state])
            _normed(dbc[rank + n_state :], c_norm, eps, dbc[rank + n_state :])
        low_rank, Bc, Cc = dbc[:rank], dbc[rank : rank + n_state], dbc[rank + n_state :]
        for c in range(inner):  # dt_proj + softplus (torch's threshold 20), the state update, y = C h + D u
            s = dt_b[c] + _dot(dt_w[c], low_rank)
            dt = s if s > 20.0 else math.log1p(math.exp(s))
            du = dt * u[c]
            hc, ac = state[c], a2[c]
            acc = np.float32(0.0)
            for n in range(n_state):
                v = hc[n] * _exp2(dt * ac[n]) + du * Bc[n]
                hc[n] = v
                acc += v * Cc[n]
            y[c] = (acc + u[c] * d[c]) * _silu(xz[inner + c])
        ob, rb = out[b], x[b]
        for i in range(out_w.shape[0]):  # out_proj, the residual
            ob[i] = rb[i] + out_b[i] + _dot(out_w[i], y)


@numba.njit(fastmath=True, cache=True, nogil=True)
def swiglu_step(x, norm_w, norm_eps, gate_w, gate_b, up_w, up_b, down_w, down_b, out):  # pragma: no cover
    """A decoder layer's FFN half for rows x [B, d_model]: out = x + swiglu(rms_norm(x) * norm_w), SwiGLU being
    down(silu(gate n) * up n)."""
    h = np.empty(gate_w.shape[0], np.float32)
    xb = np.empty(x.shape[1], np.float32)
    for b in range(x.shape[0]):
        _normed(x[b], norm_w, norm_eps, xb)
        ob, rb = out[b], x[b]
        for k in range(gate_w.shape[0]):
            h[k] = _silu(gate_b[k] + _dot(gate_w[k], xb)) * (up_b[k] + _dot(up_w[k], xb))
        for i in range(down_w.shape[0]):
            ob[i] = rb[i] + down_b[i] + _dot(down_w[i], h)


@intrinsic
def _as_float32(typingctx, bits):  # pragma: no cover - compiled
    """The float32 whose bits are the int32 ``bits`` (an LLVM bitcast: how exp2 builds 2^n)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(fastmath=True, inline="always")
def _exp2(x):  # pragma: no cover - compiled
    """2^x in float32, in operations a loop vectorises (libm's exp2 does not: numba has no vector math library
    here): x = n + f, |f| <= 1/2, 2^f by Cephes' exp2f polynomial, 2^n from the exponent bits. Measured against
    float64: max relative error 1.0e-7 (under one fp32 ulp). x is clamped to [-126, 126], where 2^x is a normal
    float (the scan's decays never need less than 2^-126 ~ 1e-38)."""
    x = min(max(x, np.float32(-126.0)), np.float32(126.0))
    n = np.floor(x + np.float32(0.5))
    f = x - n
    p = np.float32(1.535336188319500e-4)
    p = p * f + np.float32(1.339887440266574e-3)
    p = p * f + np.float32(9.618437357674640e-3)
    p = p * f + np.float32(5.550332471162809e-2)
    p = p * f + np.float32(2.402264791363012e-1)
    p = p * f + np.float32(6.931472028550421e-1)
    p = p * f + np.float32(1.0)
    return p * _as_float32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@numba.njit(fastmath=True, cache=True, nogil=True)
def scan_channels(delta, du, a2, Bm, C, h, y, start, stop, low):  # pragma: no cover - compiled
    """The inference scan (``selective_scan._scan_inference``) for channels ``start:stop``, all time steps:
    h = exp2(delta[t] a2) h + B[t] (x) du[t]; y[t] = C[t] h.

    delta, du (delta * u), y (written) [B, L, D]; a2 = A log2(e) [N, D]; Bm, C [B, L, N]; h [B, N, D] (the
    initial state in, the last out); ``low`` (float32): the least log2-decay (below it, raised to it). Channels
    are independent, so threads can take disjoint ranges (no GIL held). The inner loops run over 1-D slices
    along D, which LLVM vectorises, the decays included (``_exp2``); indexing the 3-D arrays there does not.
    """
    rows, length, _ = delta.shape
    for b in range(rows):
        hb = h[b]
        for t in range(length):
            yt, dt, ut = y[b, t, start:stop], delta[b, t, start:stop], du[b, t, start:stop]
            yt[:] = 0.0
            for n in range(a2.shape[0]):
                bn, cn = Bm[b, t, n], C[b, t, n]
                hn, an = hb[n, start:stop], a2[n, start:stop]
                for d in range(stop - start):
                    v = _exp2(max(dt[d] * an[d], low)) * hn[d] + bn * ut[d]
                    hn[d] = v
                    yt[d] += cn * v
