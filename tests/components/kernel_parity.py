"""The real CUDA kernels (``mamba_ssm``, ``causal_conv1d``) against an SSM mixer's PyTorch path, same weights;
and strict stand-ins for those kernels (their exact signatures and checks) for the CPU tests.

Shared by the ``gpu`` tests of test_mamba.py and test_mamba2.py. A test calls ``skip_without_kernels`` with the
mixer's probe (``components.mixers.kernels.mamba1_kernels`` / ``mamba2_kernels``) before building a mixer with
``use_kernels="always"`` (construction fails without the kernels), then compares that mixer on CUDA with one
built with ``use_kernels="never"`` and run on the CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP32_RTOL = 5e-4  # fp32: kernel and PyTorch path differ only in summation order (and exp2 vs exp)
LOWP_SLACK = 1e-2  # bf16: on top of twice the PyTorch path's own error in that dtype (a bf16 ulp is 0.4%)


def skip_without_kernels(probe: Callable[[], tuple[object | None, str]]) -> None:
    """Skip the calling test, saying why, unless CUDA is available and ``probe()`` finds the kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kernels, missing = probe()
    if kernels is None:
        pytest.skip(f"the CUDA kernels cannot be imported: {missing}")


def forward_backward(m: nn.Module, x: Tensor) -> dict[str, Tensor | None]:
    """m(x) and the gradients of a fixed random projection of it (input and every parameter), fp32 on the CPU."""
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = m(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out.float() * weight).sum().backward()
    found = {"out": out, "x.grad": x.grad, **{f"{n}.grad": p.grad for n, p in m.named_parameters()}}
    return {k: None if v is None else v.detach().float().cpu() for k, v in found.items()}


def assert_kernel_path_matches(
    ref: nn.Module, kernel_mixer: nn.Module, x: Tensor, dtype: torch.dtype, device: str = "cuda"
) -> None:
    """``kernel_mixer`` (``use_kernels="always"``) on CUDA in ``dtype`` against ``ref`` (``use_kernels="never"``)
    on the CPU, forward and backward, with ``ref``'s weights (rounded to ``dtype``) copied into both.

    fp32: each output and gradient within ``FP32_RTOL`` of the reference's largest magnitude. bf16: the kernel
    path's error against the fp32 PyTorch path (same rounded weights and inputs) may be at most twice the error
    of the PyTorch path itself run in ``dtype``, plus ``LOWP_SLACK`` of the magnitude.
    """
    ref.to(dtype).float()  # the weights as ``dtype`` holds them, computed in fp32
    kernel_mixer.load_state_dict(ref.state_dict())
    kernel_mixer.to(device, dtype)
    x = x.to(dtype).float()
    exact = forward_backward(ref, x)
    got = forward_backward(kernel_mixer, x.to(device, dtype))
    budget = None if dtype == torch.float32 else forward_backward(copy.deepcopy(ref).to(dtype), x.to(dtype))
    assert got.keys() == exact.keys()
    for name, want in exact.items():
        assert want is not None and got[name] is not None, name
        scale = want.abs().max().item()
        err = (got[name] - want).abs().max().item()
        if budget is None:
            tol = FP32_RTOL * scale + 1e-6
        else:
            tol = 2 * (budget[name] - want).abs().max().item() + LOWP_SLACK * scale
        assert err <= tol, f"{name} ({dtype}): max error {err:.3g} > {tol:.3g} (magnitude {scale:.3g})"


def assert_kernel_decoding_matches(
    ref: nn.Module, kernel_mixer: nn.Module, x: Tensor, split: int, device: str = "cuda"
) -> None:
    """Decoding on the kernel path (fp32, CUDA): a prefill of ``x[:, :split]``, a continuation of three tokens,
    then one token at a time; the outputs must equal ``ref``'s full forward on the CPU."""
    kernel_mixer.load_state_dict(ref.state_dict())
    kernel_mixer.to(device)
    xc = x.to(device)
    with torch.no_grad():
        full = ref(x)
        state = kernel_mixer.allocate_cache(x.shape[0], x.shape[1])
        outs = [kernel_mixer(xc[:, :split], state), kernel_mixer(xc[:, split : split + 3], state)]
        outs += [kernel_mixer(xc[:, t : t + 1], state) for t in range(split + 3, x.shape[1])]
    got = torch.cat(outs, dim=1).cpu()
    assert state.seqlen_offset == x.shape[1]
    scale = full.abs().max().item()
    assert (got - full).abs().max().item() <= FP32_RTOL * scale + 1e-6


# --- stand-ins for the kernels, for CPU tests of the CUDA path's plumbing ------------------------------------
#
# Each has the exact signature of the upstream function it replaces (mamba-ssm 2.2.5-2.3.x, causal-conv1d
# 1.5.1-1.6.x) and raises where upstream's Python asserts or C++ TORCH_CHECKs would (dtypes, layouts, strides,
# shapes, widths), so a test proves the mixers pass the right arguments in the right layout and dtype. The math
# is written here independently of the mixers' PyTorch path (per-step scans, per-sequence convolutions).


class KernelCheck(AssertionError):
    """What the real kernel would have refused (a TORCH_CHECK or an assert upstream)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise KernelCheck(message)


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_conv_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None) -> bool:
    """causal-conv1d's ``causal_conv1d_fwd`` checks (csrc/causal_conv1d.cpp); returns is_channel_last.

    Adds the one requirement the C++ does not check but its channel-last kernel relies on: vector loads of 16
    bytes from the tensor's start (an aligned data pointer).
    """
    _require(x.dtype in FLOATS and weight.dtype in FLOATS, f"dtypes {x.dtype}, {weight.dtype}")
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    _require(
        tuple(weight.shape) == (dim, width), f"weight must have shape (dim, width), got {tuple(weight.shape)}"
    )
    _require(x.stride(2) == 1 or x.stride(1) == 1, f"x strides {x.stride()}: neither layout")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        _require(dim % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now")
        _require(
            x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
            "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) to be "
            f"multiples of 8, got {x.stride()}",
        )
        _require(x.data_ptr() % 16 == 0, "channel-last vector loads need a 16-byte aligned start")
    _require(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
    if bias is not None:
        _require(bias.dtype == weight.dtype, f"bias dtype {bias.dtype} != weight dtype {weight.dtype}")
        _require(bias.stride(-1) == 1 and tuple(bias.shape) == (dim,), "bias shape/stride")
    if seq_idx is not None:
        _require(channel_last, "seq_idx is only supported for channel last layout")
        _require(seq_idx.dtype == torch.int32, f"seq_idx must be int32, got {seq_idx.dtype}")
        _require(seq_idx.is_contiguous() and tuple(seq_idx.shape) == (batch, seqlen), "seq_idx shape/layout")
    return channel_last


def conv_ref(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, silu: bool) -> Tensor:
    """Depthwise causal conv [B, D, L]; with ``seq_idx``, each packed sequence convolved on its own."""
    width = weight.shape[-1]
    f = torch.promote_types(x.dtype, torch.float32)

    def conv(seg: Tensor) -> Tensor:
        return F.conv1d(
            seg.to(f), weight.to(f).unsqueeze(1), None if bias is None else bias.to(f), padding=width - 1,
            groups=seg.shape[1],
        )[..., : seg.shape[-1]]  # fmt: skip

    if seq_idx is None:
        out = conv(x)
    else:
        rows = []
        for b in range(x.shape[0]):
            ids = seq_idx[b].tolist()
            starts = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
            rows.append(torch.cat([conv(x[b : b + 1, :, s:e]) for s, e in zip(starts, starts[1:])], dim=-1))
        out = torch.cat(rows)
    return (F.silu(out) if silu else out).to(x.dtype)


conv_layouts: list[
    str
] = []  # "channel-first" / "channel-last", one per causal_conv1d_fn call (tests read it)


def causal_conv1d_fn(
    x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False, final_states_out=None,
    activation=None,
):  # fmt: skip
    """causal_conv1d.causal_conv1d_fn: x [B, D, L], weight [D, W] -> [B, D, L] in x's dtype."""
    if activation not in [None, "silu", "swish"]:
        raise NotImplementedError("activation must be None, silu, or swish")
    if x.stride(2) != 1 and x.stride(1) != 1:
        x = x.contiguous()
    if seq_idx is not None:
        _require(initial_states is None, "initial_states must be None if seq_idx is not None")
        _require(not return_final_states, "If seq_idx is not None, we don't return final_states_out")
    _require(
        initial_states is None and not return_final_states, "stand-in: initial/final states not modelled"
    )
    channel_last = check_conv_fwd(x, weight, bias, seq_idx)
    conv_layouts.append("channel-last" if channel_last else "channel-first")
    return conv_ref(x, weight, bias, seq_idx, activation in ("silu", "swish"))


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):  # fmt: skip
    """causal_conv1d.causal_conv1d_update: x [B, D] (or [B, D, L]), conv_state [B, D, state_len], updated in place."""
    if activation not in [None, "silu", "swish"]:
        raise NotImplementedError("activation must be None, silu, or swish")
    _require(cache_seqlens is None and conv_state_indices is None, "stand-in: circular buffers not modelled")
    unsqueeze = x.dim() == 2
    if unsqueeze:
        x = x.unsqueeze(-1)
    _require(x.dtype in FLOATS and weight.dtype in FLOATS, f"dtypes {x.dtype}, {weight.dtype}")
    _require(conv_state.dtype == x.dtype, f"conv_state dtype {conv_state.dtype} != input dtype {x.dtype}")
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    _require(conv_state.shape[2] >= width - 1, "conv_state_len >= width - 1")
    _require(tuple(conv_state.shape[:2]) == (batch, dim), f"conv_state shape {tuple(conv_state.shape)}")
    _require(tuple(weight.shape) == (dim, width), "weight shape")
    _require(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
    if bias is not None:
        _require(bias.dtype == weight.dtype, f"bias dtype {bias.dtype} != weight dtype {weight.dtype}")
    state_len = conv_state.shape[-1]
    x_new = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
    conv_state.copy_(x_new[:, :, -state_len:])
    out = F.conv1d(x_new, weight.unsqueeze(1), bias, padding=0, groups=dim)[:, :, -seqlen:]
    out = (F.silu(out) if activation in ("silu", "swish") else out).to(x.dtype)
    return out.squeeze(-1) if unsqueeze else out


def _check_scan(u, delta, A, B, C, D, z, delta_bias) -> None:
    """selective_scan_cuda's ``selective_scan_fwd`` checks (csrc/selective_scan/selective_scan.cpp)."""
    _require(u.dtype in FLOATS, f"u dtype {u.dtype}")
    _require(A.dtype == torch.float32, f"A must be float32, got {A.dtype}")
    _require(delta.dtype == u.dtype, f"delta dtype {delta.dtype} != u dtype {u.dtype}")
    _require(
        B.dtype == u.dtype and C.dtype == u.dtype, f"B/C dtypes {B.dtype}/{C.dtype} != u dtype {u.dtype}"
    )
    _require(u.stride(-1) == 1 and delta.stride(-1) == 1, "u/delta must be contiguous along L")
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    _require(tuple(A.shape) == (dim, dstate), "A shape")
    _require(dstate <= 256, "selective_scan only supports state dimension <= 256")
    _require(B.shape[-1] == seqlen and B.shape[-2] == dstate and C.shape == B.shape, "B/C shapes")
    if D is not None:
        _require(
            D.dtype == torch.float32 and tuple(D.shape) == (dim,), f"D must be float32 [dim], got {D.dtype}"
        )
    if delta_bias is not None:
        _require(delta_bias.dtype == torch.float32, f"delta_bias must be float32, got {delta_bias.dtype}")
    if z is not None:
        _require(z.dtype == u.dtype and z.stride(-1) == 1, f"z dtype {z.dtype} != u dtype {u.dtype}")


def _scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Per-step Mamba-1 scan, channel-first: u, delta, z [B, D, L]; B, C [B, N, L]. Returns (y, last) fp32."""
    u32, d32 = u.float(), delta.float()
    if delta_bias is not None:
        d32 = d32 + delta_bias.float()[:, None]
    if delta_softplus:
        d32 = F.softplus(d32)
    h = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = (
            torch.exp(d32[..., t, None] * A) * h
            + (d32[..., t] * u32[..., t])[..., None] * B[:, None, :, t].float()
        )
        ys.append((h * C[:, None, :, t].float()).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u32 * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y, h


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):  # fmt: skip
    """mamba_ssm.ops.selective_scan_interface.selective_scan_fn: u, delta, z [B, D, L]; B, C [B, N, L]."""
    u = u if u.stride(-1) == 1 else u.contiguous()
    delta = delta if delta.stride(-1) == 1 else delta.contiguous()
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    z = z if z is None or z.stride(-1) == 1 else z.contiguous()
    _check_scan(u, delta, A, B, C, D, z, delta_bias)
    y, last = _scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (y.to(u.dtype), last) if return_last_state else y.to(u.dtype)


def mamba_inner_fn(
    xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A, B=None,
    C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1,
    b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None, b_c_dt_rms_eps=1e-6,
):  # fmt: skip
    """mamba_ssm's MambaInnerFn.forward, step by step: xz [B, 2D, L], conv1d_weight [D, 1, W] -> [B, L, d_model]."""
    _require(checkpoint_lvl in [0, 1], "checkpoint_lvl")
    _require(
        B is None and C is None and B_proj_bias is None and C_proj_bias is None, "stand-in: variable B, C"
    )
    _require(
        b_rms_weight is None and c_rms_weight is None and dt_rms_weight is None, "stand-in: no inner norms"
    )
    L = xz.shape[-1]
    delta_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1]
    if torch.is_autocast_enabled():
        dtype = torch.get_autocast_gpu_dtype()
        x_proj_weight, delta_proj_weight = x_proj_weight.to(dtype), delta_proj_weight.to(dtype)
        out_proj_weight = out_proj_weight.to(dtype)
        out_proj_bias = out_proj_bias.to(dtype) if out_proj_bias is not None else None
    if xz.stride(-1) != 1:
        xz = xz.contiguous()
    _require(conv1d_weight.dim() == 3 and conv1d_weight.shape[1] == 1, "conv1d_weight must be [d, 1, w]")
    conv1d_weight = conv1d_weight[:, 0]
    x, z = xz.chunk(2, dim=1)
    check_conv_fwd(x, conv1d_weight, conv1d_bias, None)
    conv1d_out = conv_ref(x, conv1d_weight, conv1d_bias, None, True)
    x_dbl = F.linear(conv1d_out.transpose(1, 2).reshape(-1, conv1d_out.shape[1]), x_proj_weight)  # (b l) d
    delta = (delta_proj_weight @ x_dbl[:, :delta_rank].t()).unflatten(1, (-1, L)).transpose(0, 1)  # b d l
    Bm = x_dbl[:, delta_rank : delta_rank + d_state].unflatten(0, (-1, L)).transpose(1, 2).contiguous()
    Cm = x_dbl[:, -d_state:].unflatten(0, (-1, L)).transpose(1, 2).contiguous()
    D = D.contiguous() if D is not None else None
    _check_scan(conv1d_out, delta.contiguous(), A, Bm, Cm, D, z.contiguous(), delta_bias)
    y, _ = _scan_ref(conv1d_out, delta, A, Bm, Cm, D, z, delta_bias, delta_softplus)
    return F.linear(y.to(xz.dtype).transpose(1, 2), out_proj_weight, out_proj_bias)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):  # fmt: skip
    """mamba_ssm.ops.triton.selective_state_update: state [B, (H,) D, N] updated in place; returns x's dtype."""
    has_heads = state.dim() > 3
    state_ = state if state.dim() > 3 else state.unsqueeze(1)
    x = x if x.dim() > 2 else x.unsqueeze(1)
    dt = dt if dt.dim() > 2 else dt.unsqueeze(1)
    A = A if A.dim() > 2 else A.unsqueeze(0)
    B = B if B.dim() > 2 else B.unsqueeze(1)
    C = C if C.dim() > 2 else C.unsqueeze(1)
    D = D.unsqueeze(0) if D is not None and D.dim() == 1 else D
    z = z.unsqueeze(1) if z is not None and z.dim() == 2 else z
    dt_bias = dt_bias.unsqueeze(0) if dt_bias is not None and dt_bias.dim() == 1 else dt_bias
    _, nheads, dim, dstate = state_.shape
    batch = x.shape[0]
    _require(tuple(x.shape) == (batch, nheads, dim), f"x shape {tuple(x.shape)}")
    _require(dt.shape == x.shape and tuple(A.shape) == (nheads, dim, dstate), "dt/A shapes")
    ngroups = B.shape[1]
    _require(
        nheads % ngroups == 0 and tuple(B.shape) == (batch, ngroups, dstate) and C.shape == B.shape, "B/C"
    )
    _require(D is None or tuple(D.shape) == (nheads, dim), "D shape")
    _require(z is None or z.shape == x.shape, "z shape")
    _require(dt_bias is None or tuple(dt_bias.shape) == (nheads, dim), "dt_bias shape")
    _ = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0  # tie_hdim
    per_group = nheads // ngroups
    Bh, Ch = B.float().repeat_interleave(per_group, 1), C.float().repeat_interleave(per_group, 1)  # [b, h, n]
    d = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    d = torch.where(d <= 20.0, F.softplus(d), d) if dt_softplus else d
    h = state_.float() * torch.exp(A.float() * d[..., None]) + (d * x.float())[..., None] * Bh[:, :, None, :]
    state_.copy_(h)
    out = (h * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        out = out + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)


def ssd_ref_seq(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                dt_softplus=False):  # fmt: skip
    """Per-step Mamba-2 scan with packed sequences: the state restarts from zero where ``seq_idx`` changes (the
    sequence before the first position is 0, so ``initial_states`` feeds sequence 0). Returns (y, last) fp32."""
    batch, seqlen, nheads, headdim = x.shape
    per_group = nheads // B.shape[2]
    d = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    d = F.softplus(d) if dt_softplus else d
    Bh, Ch = B.float().repeat_interleave(per_group, 2), C.float().repeat_interleave(per_group, 2)
    h = x.new_zeros(batch, nheads, headdim, B.shape[-1], dtype=torch.float32)
    if initial_states is not None:
        h = h + initial_states.float()
    prev = torch.zeros(batch, dtype=torch.long, device=x.device)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None:
            keep = (seq_idx[:, t].long() == prev).float()[:, None, None, None]
            h = h * keep
            prev = seq_idx[:, t].long()
        decay = torch.exp(d[:, t] * A.float())[..., None, None]
        h = decay * h + (x[:, t].float() * d[:, t, :, None])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x.float() * D.float().view(nheads, -1)
    if z is not None:
        y = y * F.silu(z.float())
    return y, h


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):  # fmt: skip
    """mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined (asserts of _mamba_chunk_scan_combined_fwd)."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, ngroups, dstate = B.shape
    _require(nheads % ngroups == 0, "nheads % ngroups")
    _require(tuple(B.shape) == (batch, seqlen, ngroups, dstate) and C.shape == B.shape, "B/C shapes")
    _require(tuple(dt.shape) == (batch, seqlen, nheads) and tuple(A.shape) == (nheads,), "dt/A shapes")
    _require(z is None or z.shape == x.shape, "z shape")
    _require(D is None or tuple(D.shape) in ((nheads, headdim), (nheads,)), "D shape")
    _require(seq_idx is None or tuple(seq_idx.shape) == (batch, seqlen), "seq_idx shape")
    _require(
        initial_states is None or tuple(initial_states.shape) == (batch, nheads, headdim, dstate), "init"
    )
    _require(isinstance(chunk_size, int) and chunk_size > 0, "chunk_size")
    _require(dt_limit == (0.0, float("inf")) and not return_varlen_states, "stand-in: dt_limit/varlen states")
    y, last = ssd_ref_seq(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus)
    y = y.to(x.dtype)
    return (y, last.to(C.dtype)) if return_final_states else y  # final_states: out_dtype=C.dtype upstream


fused_calls: list[str] = []  # one entry per mamba_split_conv1d_scan_combined call (tests read it)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):  # fmt: skip
    """mamba_ssm's MambaSplitConv1dScanCombinedFn.forward, step by step, with the conv input built as mamba-ssm
    2.2.5-2.2.6 build it (``rearrange_and_update_stride``) and 2.3's ``ensure_stride`` assert."""
    _require(activation in [None, "silu", "swish"], "activation")
    if D.dim() == 1:
        _require(headdim is not None, "headdim must be passed when D is 1-D")
        (nheads,) = D.shape
    else:
        nheads, headdim = D.shape
    batch, seqlen, _ = zxbcdt.shape
    dim = nheads * headdim
    _require(nheads % ngroups == 0, "nheads % ngroups")
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    _require(d_nonssm >= 0, "d_nonssm >= 0")
    _require(zxbcdt.shape[-1] == 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads, "zxbcdt width")
    _require(tuple(dt_bias.shape) == (nheads,) and tuple(A.shape) == (nheads,), "dt_bias/A shapes")
    _require(dt_limit == (0.0, float("inf")) and not return_final_states, "stand-in: dt_limit/final states")
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + ngroups * dstate * 2, nheads], dim=-1)
    # 2.3's ensure_stride asserts the conv channels; 2.2.5's rearrange_and_update_stride copies when stride(2) % 8
    _require(xBC.shape[2] % 8 == 0, "Number of convolution channels is required to be a multiple of 8.")
    conv_in = xBC.transpose(1, 2)
    conv_in = conv_in.contiguous() if conv_in.stride(2) % 8 != 0 else conv_in
    seq_idx = seq_idx.contiguous() if seq_idx is not None else None
    check_conv_fwd(conv_in, conv1d_weight, conv1d_bias, seq_idx)
    fused_calls.append(
        "channel-last" if conv_in.stride(1) == 1 and conv_in.stride(2) > 1 else "channel-first"
    )
    xBC_conv = conv_ref(conv_in, conv1d_weight, conv1d_bias, seq_idx, activation is not None).transpose(1, 2)
    x, B, C = torch.split(xBC_conv, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.unflatten(-1, (nheads, headdim))
    B, C = B.unflatten(-1, (ngroups, dstate)), C.unflatten(-1, (ngroups, dstate))
    z4 = z.unflatten(-1, (nheads, headdim))
    y, _ = ssd_ref_seq(
        x, dt, A, B, C, D, z4 if rmsnorm_weight is None else None, dt_bias, initial_states, seq_idx, True
    )
    y = y.flatten(-2)  # fp32
    if rmsnorm_weight is not None:  # layernorm_gated, group_size = dim // ngroups, computed in fp32
        y = y.to(x.dtype).float()
        zf = z.float()
        if not norm_before_gate:
            y = y * F.silu(zf)
        groups = y.unflatten(-1, (ngroups, -1))
        y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + rmsnorm_eps)).flatten(-2)
        y = y * rmsnorm_weight.float()
        if norm_before_gate:
            y = y * F.silu(zf)
    out = y.to(x.dtype)
    if d_nonssm > 0:
        z0, x0 = zx0.chunk(2, dim=-1)
        out = torch.cat([(F.silu(z0.float()) * x0.float()).to(x.dtype), out], dim=-1)
    if outproj_weight is not None:
        if torch.is_autocast_enabled():
            dtype = torch.get_autocast_gpu_dtype()
            out, outproj_weight = out.to(dtype), outproj_weight.to(dtype)
            outproj_bias = outproj_bias.to(dtype) if outproj_bias is not None else None
        out = F.linear(out, outproj_weight, outproj_bias)
    else:
        _require(outproj_bias is None, "outproj_bias without outproj_weight")
    return out


def stand_in_kernels(mixer: str, **overrides) -> SimpleNamespace:
    """The probe's result with every kernel replaced by its stand-in (``mixer``: "mamba" or "mamba2")."""
    versions = {"mamba_ssm": "2.2.6", "causal_conv1d": "1.5.2"}
    if mixer == "mamba":
        fns = dict(
            selective_scan_fn=selective_scan_fn,
            mamba_inner_fn=mamba_inner_fn,
            causal_conv1d_fn=causal_conv1d_fn,
            causal_conv1d_update=causal_conv1d_update,
            selective_state_update=selective_state_update,
            inner_reason="",
        )
    else:
        fns = dict(
            mamba_chunk_scan_combined=mamba_chunk_scan_combined,
            mamba_split_conv1d_scan_combined=mamba_split_conv1d_scan_combined,
            causal_conv1d_fn=causal_conv1d_fn,
            causal_conv1d_update=causal_conv1d_update,
            selective_state_update=selective_state_update,
            fused_reason="",
        )
    return SimpleNamespace(**{**fns, **overrides}, versions=versions)


def count_calls(namespace: SimpleNamespace, name: str, monkeypatch) -> list[int]:
    """Wrap ``namespace.<name>`` (e.g. the real probe's result on a GPU) to count its calls: returns [count]."""
    fn, calls = getattr(namespace, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(namespace, name, counted)
    return calls
