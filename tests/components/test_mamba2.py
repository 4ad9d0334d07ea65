"""Mamba-2 mixer: the chunked SSD path against a per-step reference written here (outputs and gradients),
decoding, packed sequences (seq_idx), mamba_ssm state-dict names, kernel selection and probing (the CUDA path
on CPU through strict stand-ins for its kernels, ``kernel_parity.py``; the ``gpu`` tests run the real ones)."""

from __future__ import annotations

import logging
import re
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from components.mixers import kernels as mixer_kernels
from components.mixers import mamba2 as mamba2_module
from components.mixers.kernels import mamba2_kernels
from components.mixers.mamba2 import Mamba2, Mamba2State
from components.mixers.ssd import ssd_chunked
from tests.components import kernel_parity as kp
from tests.components.kernel_parity import (
    assert_kernel_decoding_matches,
    assert_kernel_path_matches,
    skip_without_kernels,
)
from tests.components.ssm_reference import ssd_ref
from toolkit.errors import ChimeraError
from toolkit.registry import build, get

D_MODEL, BATCH, LENGTH = 32, 2, 37  # 37: not a multiple of the CPU chunk (64) nor of the small chunks below


def reference_forward(m: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """Mamba-2 written out step by step (h_t = exp(dt A) h_{t-1} + dt x_t B_t^T per head), reading the module."""
    Bsz, L, _ = x.shape
    H, P, N, G = m.nheads, m.headdim, m.d_state, m.ngroups
    zxbcdt = x @ m.in_proj.weight.T
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [m.d_mlp, m.d_mlp, m.d_ssm, m.conv_dim, H], dim=-1)
    w, width = m.conv1d.weight[:, 0], m.d_conv
    conv = []
    for t in range(L):
        acc = m.conv1d.bias.expand(Bsz, -1)
        for k in range(width):
            src = t - (width - 1) + k
            if src >= 0:
                acc = acc + w[:, k] * xBC[:, src]
        conv.append(F.silu(acc))
    xBC = torch.stack(conv, dim=1)
    xs, B, C = torch.split(xBC, [m.d_ssm, G * N, G * N], dim=-1)
    xs = xs.reshape(Bsz, L, H, P)
    B = B.reshape(Bsz, L, G, N).repeat_interleave(H // G, dim=2)  # [B, L, H, N]
    C = C.reshape(Bsz, L, G, N).repeat_interleave(H // G, dim=2)
    dt = F.softplus(dt + m.dt_bias)  # [B, L, H]
    A = -torch.exp(m.A_log)
    D = m.D.reshape(H, P) if m.D_has_hdim else m.D[:, None]
    h = torch.zeros(Bsz, H, P, N)
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * xs[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1) + D * xs[:, t])
    y = torch.stack(ys, dim=1).reshape(Bsz, L, m.d_ssm)
    if m.rmsnorm:
        gated = y * F.silu(z)
        groups = gated.reshape(Bsz, L, G, -1)
        y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + m.norm.eps)).reshape(Bsz, L, -1)
        y = y * m.norm.weight
    else:
        y = y * F.silu(z)
    if m.d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return y @ m.out_proj.weight.T


CONFIGS = {
    "default": dict(d_state=16, headdim=16),
    "groups+hdimD+mlp": dict(d_state=8, headdim=8, ngroups=2, D_has_hdim=True, d_ssm=48),
    "no-norm": dict(d_state=8, headdim=16, rmsnorm=False),
}


def make(d_model: int = D_MODEL, use_kernels: str = "never", **kwargs) -> Mamba2:
    torch.manual_seed(0)
    m = Mamba2(d_model, use_kernels=use_kernels, **kwargs)
    with torch.no_grad():  # larger time steps than the init, non-trivial D and norm weights
        m.dt_bias.add_(1.0)
        m.D.uniform_(0.5, 1.5)
        if m.rmsnorm:
            m.norm.weight.uniform_(0.5, 1.5)
    return m


def grads(m, x, fn):
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = fn(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    return out.detach(), {"x": x.grad, **{n: p.grad for n, p in m.named_parameters()}}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_sequential_reference_outputs_and_gradients(config, monkeypatch):
    monkeypatch.setattr(mamba2_module, "SSD_CHUNK", 16)  # several chunks and a partial one at L=37
    m = make(**CONFIGS[config])
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    out, g = grads(m, x, m)
    ref, g_ref = grads(m, x, lambda t: reference_forward(m, t))
    assert out.shape == (BATCH, LENGTH, D_MODEL)
    assert (out - ref).abs().max() <= 1e-4
    assert g.keys() == g_ref.keys()
    for name in g:
        assert g[name] is not None, name
        assert (g[name] - g_ref[name]).abs().max() <= 1e-4, name


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_ssd_chunked_matches_its_reference_with_initial_and_final_state(chunk):
    torch.manual_seed(0)
    Bsz, L, H, P, G, N = 2, 37, 4, 8, 2, 16
    x, dt = torch.randn(Bsz, L, H, P), torch.randn(Bsz, L, H) + 1.0  # large steps: long decays underflow
    A, B, C = -torch.rand(H) * 15 - 1, torch.randn(Bsz, L, G, N) / 4, torch.randn(Bsz, L, G, N) / 4
    D, bias, h0 = torch.randn(H), torch.randn(H), torch.randn(Bsz, H, P, N)
    inputs = [x, dt, A, B, C, D, bias, h0]
    results = []
    for fn, kwargs in ((ssd_chunked, {"chunk_size": chunk}), (ssd_ref, {})):
        leaves = [t.clone().requires_grad_() for t in inputs]
        *args, h = leaves
        y, last = fn(*args, dt_softplus=True, initial_state=h, return_final_state=True, **kwargs)
        (y.sin().sum() + (last * 0.5).sum()).backward()
        results.append([y, last] + [t.grad for t in leaves])
    for ours, ref in zip(*results):
        assert torch.isfinite(ours).all()
        assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("config", ["default", "groups"])
def test_matches_transformers_mamba2_mixer_outputs_and_gradients(config):
    """transformers' Mamba2Mixer on its PyTorch path (its own chunked SSD, chunk 16 here), same weights."""
    if mamba2_kernels()[0] is not None:
        pytest.skip("with mamba_ssm importable transformers sends CPU tensors to the Triton kernels")
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    m = make(**(CONFIGS["default"] if config == "default" else dict(d_state=8, headdim=8, ngroups=2)))
    hf_config = Mamba2Config(
        hidden_size=D_MODEL,
        state_size=m.d_state,
        expand=2,
        head_dim=m.headdim,
        num_heads=m.nheads,
        n_groups=m.ngroups,
        conv_kernel=m.d_conv,
        chunk_size=16,
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=m.norm.eps,
        num_hidden_layers=1,
    )
    theirs = Mamba2Mixer(hf_config, layer_idx=0)  # training mode: its fused kernel is absent, PyTorch runs
    theirs.load_state_dict(m.state_dict())  # names and shapes match
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    out, g = grads(m, x, m)
    ref, g_ref = grads(theirs, x, theirs)
    assert (out - ref).abs().max() <= 1e-4
    assert g.keys() == g_ref.keys()
    for name in g:
        assert (g[name] - g_ref[name]).abs().max() <= 1e-4, name


def test_ssd_chunked_on_an_empty_sequence_passes_the_state_through():
    x, dt, A = torch.randn(2, 0, 4, 8), torch.randn(2, 0, 4), -torch.rand(4)
    B = C = torch.randn(2, 0, 2, 16)
    h0 = torch.randn(2, 4, 8, 16)
    y, last = ssd_chunked(x, dt, A, B, C, torch.randn(4), initial_state=h0, return_final_state=True)
    assert y.shape == x.shape and torch.equal(last, h0)
    y, last = ssd_chunked(x, dt, A, B, C, return_final_state=True)
    assert torch.equal(last, torch.zeros(2, 4, 8, 16))


def test_mixer_ssd_method_and_the_bench_baseline_compute_the_reference_scan():
    """``Mamba2.ssd`` (what ``chimera bench mixers`` times) and the bench's sequential baseline."""
    from toolkit.bench_mixers import _ssd_sequential

    m = make(**CONFIGS["default"])
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    x, dt = torch.randn(BATCH, LENGTH, H, P), torch.randn(BATCH, LENGTH, H)
    B, C, h0 = torch.randn(BATCH, LENGTH, G, N), torch.randn(BATCH, LENGTH, G, N), torch.randn(BATCH, H, P, N)
    A = -torch.exp(m.A_log)
    with torch.no_grad():
        want, want_last = ssd_ref(x, dt, A, B, C, m.D, m.dt_bias, True, h0, return_final_state=True)
        y, last = m.ssd(x, dt, B, C, initial_state=h0, return_final_state=True)
        baseline = _ssd_sequential(x, dt, A, B, C, m.D, m.dt_bias)
        no_state = ssd_ref(x, dt, A, B, C, m.D, m.dt_bias, True)
    assert m.torch_chunk_size == mamba2_module.SSD_CHUNK
    assert (y - want).abs().max() <= 1e-4 and (last - want_last).abs().max() <= 1e-4
    assert (baseline - no_state).abs().max() <= 1e-5


@pytest.mark.parametrize("config", ["default", "groups+hdimD+mlp"])
def test_prefill_then_steps_equal_full_forward(config):
    m = make(**CONFIGS[config])
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_cache(BATCH, 64)
        assert isinstance(state, Mamba2State)
        assert state.conv_state.shape == (BATCH, m.conv_dim, m.d_conv)
        assert state.ssm_state.shape == (BATCH, m.nheads, m.headdim, m.d_state)
        outs = [m(x[:, :10], state), m(x[:, 10:13], state)]  # a prefill, then a chunk continuing from it
        outs += [m(x[:, t : t + 1], state) for t in range(13, LENGTH)]
        assert state.seqlen_offset == LENGTH
    assert (torch.cat(outs, dim=1) - full).abs().max() <= 1e-4


def test_state_dict_names_and_shapes_are_mamba_ssm_s():
    m = Mamba2(64, d_state=16, headdim=32, expand=2, ngroups=1)  # d_inner 128, 4 heads, conv_dim 128 + 32
    expected = {
        "in_proj.weight": (2 * 128 + 2 * 16 + 4, 64),
        "conv1d.weight": (160, 1, 4),
        "conv1d.bias": (160,),
        "dt_bias": (4,),
        "A_log": (4,),
        "D": (4,),
        "norm.weight": (128,),
        "out_proj.weight": (64, 128),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    other = Mamba2(64, d_state=16, headdim=32)
    other.load_state_dict(m.state_dict())
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.equal(other(x), m(x))
    a = -torch.exp(m.A_log)
    assert (a <= -1).all() and (a >= -16).all()
    assert all(p._no_weight_decay for p in (m.A_log, m.D, m.dt_bias))
    with torch.device("meta"):
        assert Mamba2(4096).A_log.is_meta
        lazy = Mamba2(64, d_state=16, headdim=32)
    lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    assert torch.equal(lazy.D, torch.ones(4)) and torch.equal(lazy.norm.weight, torch.ones(128))
    assert (-torch.exp(lazy.A_log) <= -1).all() and (F.softplus(lazy.dt_bias) >= 0.001 * 0.999).all()


def test_use_kernels_always_without_kernels_fails_at_construction(monkeypatch):
    monkeypatch.setattr(
        mamba2_module, "mamba2_kernels", lambda: (None, "mamba_ssm.ops.triton.ssd_combined (...)")
    )
    with pytest.raises(ChimeraError) as err:
        Mamba2(D_MODEL, use_kernels="always")
    assert "mamba_ssm" in str(err.value) and "pip install 'chimera-toolkit[gpu]'" in str(err.value)
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(D_MODEL, headdim=48)


def test_use_kernels_always_on_this_cpu_machine_names_what_is_missing():
    """No test double: on a machine without mamba_ssm the real probe fails and the error says so."""
    if mamba2_kernels()[0] is not None:
        pytest.skip("mamba_ssm is installed here")
    with pytest.raises(ChimeraError, match=r"mamba_ssm.*pip install 'chimera-toolkit\[gpu\]'"):
        Mamba2(D_MODEL, use_kernels="always")


def test_auto_on_cpu_never_probes_the_kernels(monkeypatch):
    def no_probe():
        raise AssertionError("the kernels must not be probed for CPU tensors")

    monkeypatch.setattr(mamba2_module, "mamba2_kernels", no_probe)
    m = Mamba2(D_MODEL, d_state=8, headdim=16)
    assert m(torch.randn(1, 3, D_MODEL)).shape == (1, 3, D_MODEL)


def test_registered_with_pattern_letter():
    entry = get("mixer", "mamba2")
    assert entry.target is Mamba2 and entry.symbol == "M"
    m = build(
        "mixer", {"name": "mamba2", "d_state": 8, "headdim": 16, "A_init_range": [2, 4]}, d_model=D_MODEL
    )
    assert m.nheads == 4 and m.A_init_range == (2.0, 4.0)


# --- packed sequences (seq_idx) on the PyTorch path ---------------------------------------------------------------


def packed_ids(lengths: list[list[int]]) -> torch.Tensor:
    """seq_idx [B, L] from per-row sequence lengths (each row sums to the same L)."""
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])


ROWS = [[16, 5, 16], [1, 30, 6]]  # boundaries on and off the chunk edges (chunks of 8/16), a 1-token sequence


def test_causal_conv_with_seq_idx_convolves_each_sequence_on_its_own():
    from components.mixers.causal_conv import causal_conv1d

    x, w, b = torch.randn(2, 6, 37), torch.randn(6, 4), torch.randn(6)
    seq_idx = packed_ids(ROWS)
    want = kp.conv_ref(x, w, b, seq_idx, True)
    assert (causal_conv1d(x, w, b, seq_idx=seq_idx) - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="cannot be combined"):
        causal_conv1d(x, w, b, prefix=torch.zeros(2, 6, 3), seq_idx=seq_idx)


@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
def test_ssd_chunked_with_seq_idx_restarts_the_state_at_each_sequence(chunk):
    """Against a per-step scan that zeroes the state where seq_idx changes (mamba_chunk_scan_combined's
    semantics: the initial state feeds sequence 0, the final state is the last sequence's)."""
    torch.manual_seed(0)
    Bsz, L, H, P, G, N = 2, 37, 4, 8, 2, 16
    x, dt = torch.randn(Bsz, L, H, P), torch.randn(Bsz, L, H)
    A, B, C = -torch.rand(H) * 4 - 0.5, torch.randn(Bsz, L, G, N) / 4, torch.randn(Bsz, L, G, N) / 4
    D, bias, h0 = torch.randn(H), torch.randn(H), torch.randn(Bsz, H, P, N)
    seq_idx = packed_ids(ROWS)
    inputs = [x, dt, A, B, C, D, bias, h0]
    results = []
    for name in ("ours", "ref"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        xx, dd, AA, BB, CC, DD, bb, hh = leaves
        if name == "ours":
            y, last = ssd_chunked(
                xx,
                dd,
                AA,
                BB,
                CC,
                DD,
                bb,
                True,
                hh,
                return_final_state=True,
                chunk_size=chunk,
                seq_idx=seq_idx,
            )
        else:
            y, last = kp.ssd_ref_seq(xx, dd, AA, BB, CC, DD, None, bb, hh, seq_idx, True)
        (y.sin().sum() + (last * 0.5).sum()).backward()
        results.append([y, last] + [t.grad for t in leaves])
    for ours, ref in zip(*results):
        assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    # row 1 starts with a 1-token sequence 0: the initial state reaches position 0 only
    plain = ssd_ref(x[1:, 1:], dt[1:, 1:], A, B[1:, 1:], C[1:, 1:], D, bias, True)
    assert (results[0][0][1:, 1:31] - plain[:, :30]).abs().max() <= 1e-4


@pytest.mark.parametrize("config", ["default", "groups+hdimD+mlp"])
def test_packed_forward_equals_separate_forwards(config):
    m = make(**CONFIGS[config])
    lengths = [9, 20, 8]
    parts = [torch.randn(1, n, D_MODEL) for n in lengths]
    packed = torch.cat(parts, 1).requires_grad_()
    out = m(packed, seq_idx=packed_ids([lengths]))
    (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    separate = torch.cat([m(p) for p in parts], 1)
    (separate * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
    assert (out - separate).abs().max() <= 1e-5
    for n, p in m.named_parameters():
        assert (packed_grads[n] - p.grad).abs().max() <= 1e-4, n
    with pytest.raises(ValueError, match="decoding state"):
        m(packed, m.allocate_cache(1, 37), seq_idx=packed_ids([lengths]))
    with pytest.raises(ValueError, match="seq_idx must be integers"):
        m(packed, seq_idx=packed_ids([lengths]).float())


# --- the CUDA path's plumbing on CPU: strict stand-ins (kernel_parity.py) with upstream's signatures and checks --


@pytest.fixture
def fake_cuda(monkeypatch):
    """Route CPU tensors as if they were on CUDA, with the stand-ins as the probe's result; returns a setter."""
    monkeypatch.setattr(mixer_kernels, "_on_cuda", lambda x: True)
    monkeypatch.setattr(mixer_kernels, "_LOGGED", set())
    kp.conv_layouts.clear()
    kp.fused_calls.clear()

    def use(kernels=None, missing=""):
        kernels = kp.stand_in_kernels("mamba2") if kernels is None and not missing else kernels
        monkeypatch.setattr(mamba2_module, "mamba2_kernels", lambda: (kernels, missing))
        return kernels

    return use


KERNEL_CONFIGS = {  # name: (d_model, mixer kwargs, fused?, conv layout of the unfused path)
    # in_proj width 2*64 + 32 + 8 = 168, conv channels 96, xBC at 64: upstream's fused path, channel-last conv
    "fused": (32, dict(d_state=16, headdim=8), True, None),
    "fused-groups+hdimD+mlp": (
        40,
        dict(d_state=8, headdim=8, ngroups=2, D_has_hdim=True, d_ssm=64),
        True,
        None,
    ),
    "fused-no-norm": (32, dict(d_state=16, headdim=8, rmsnorm=False), True, None),
    "fused-norm-before-gate": (32, dict(d_state=16, headdim=8, norm_before_gate=True), True, None),
    # in_proj width 164: the fused function would hand causal_conv1d a channel-first copy (2.2.5) or keep a
    # view with misaligned strides (2.3): not taken; the conv gets a channel-first copy
    "unaligned": (32, dict(CONFIGS["default"]), False, "channel-first"),
    "unaligned-groups+hdimD+mlp": (32, dict(CONFIGS["groups+hdimD+mlp"]), False, "channel-first"),
}


def forward_and_grads(m, x, **kwargs):
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = m(x, **kwargs)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return {"out": out.detach(), "x": x.grad, **{n: p.grad for n, p in m.named_parameters()}}


@pytest.mark.parametrize("config", list(KERNEL_CONFIGS))
def test_kernel_path_passes_upstream_checks_and_computes_the_torch_path_s_math(fake_cuda, config):
    d_model, kwargs, fused, layout = KERNEL_CONFIGS[config]
    m = make(d_model, **kwargs)
    assert (m.fused_layout == "") is fused, m.fused_layout
    x = torch.randn(BATCH, LENGTH, d_model)
    want = forward_and_grads(m, x)
    with torch.no_grad():
        state_ref = m.allocate_cache(BATCH, LENGTH)
        torch_steps = [m(x[:, :20], state_ref), m(x[:, 20:25], state_ref)]
        torch_steps += [m(x[:, t : t + 1], state_ref) for t in range(25, LENGTH)]
    fake_cuda()
    m.use_kernels = "auto"
    got = forward_and_grads(m, x)
    assert kp.fused_calls == (["channel-last"] if fused else [])
    assert kp.conv_layouts == ([] if fused else [layout])
    for name in want:
        assert (got[name] - want[name]).abs().max() <= 1e-4, name
    with torch.no_grad():  # prefill: causal_conv1d_fn + mamba_chunk_scan_combined; then the one-token kernels
        state = m.allocate_cache(BATCH, LENGTH)
        outs = [m(x[:, :20], state), m(x[:, 20:25], state)] + [
            m(x[:, t : t + 1], state) for t in range(25, LENGTH)
        ]
    assert (torch.cat(outs, 1) - torch.cat(torch_steps, 1)).abs().max() <= 1e-4
    assert (state.ssm_state - state_ref.ssm_state).abs().max() <= 1e-4
    assert torch.equal(state.conv_state, state_ref.conv_state)


@pytest.mark.parametrize("config", ["fused", "unaligned"])
def test_kernel_path_with_seq_idx_equals_the_torch_path(fake_cuda, config):
    d_model, kwargs, fused, _ = KERNEL_CONFIGS[config]
    m = make(d_model, **kwargs)
    x, seq_idx = torch.randn(2, LENGTH, d_model), packed_ids(ROWS)
    want = forward_and_grads(m, x, seq_idx=seq_idx)
    fake_cuda()
    m.use_kernels = "auto"
    got = forward_and_grads(m, x, seq_idx=seq_idx)  # seq_idx needs the channel-last conv: a copy if need be
    assert kp.fused_calls == (["channel-last"] if fused else [])
    assert kp.conv_layouts == ([] if fused else ["channel-last"])
    for name in want:
        assert (got[name] - want[name]).abs().max() <= 1e-4, name


def test_seq_idx_with_conv_channels_the_kernel_cannot_take(fake_cuda, caplog):
    """conv channels 68 (d_state 2): causal_conv1d's seq_idx needs the channel-last kernel, which needs % 8."""
    m = make(**dict(CONFIGS["default"], d_state=2))
    assert m.conv_dim == 68
    fake_cuda()
    x, seq_idx = torch.randn(2, LENGTH, D_MODEL), packed_ids(ROWS)
    m.use_kernels = "auto"
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="chimera"):
        got = m(x, seq_idx=seq_idx)
        assert kp.conv_layouts == [] and kp.fused_calls == []  # the PyTorch path
        m(x)  # without seq_idx the kernels take it (channel-first copy)
    assert kp.conv_layouts == ["channel-first"]
    assert any("seq_idx needs conv channels % 8 == 0 (got 68)" in r.getMessage() for r in caplog.records)
    m.use_kernels = "never"
    with torch.no_grad():
        assert (got - m(x, seq_idx=seq_idx)).abs().max() <= 1e-5
    m.use_kernels = "always"
    with pytest.raises(ChimeraError, match="seq_idx needs conv channels"):
        m(x, seq_idx=seq_idx)


def test_fused_function_refuses_what_fused_layout_excludes():
    """in_proj width 136 (a multiple of 8) but conv channels 68: the fused function would keep the channel-last
    view and causal_conv1d would refuse it, so the mixer must not take that path."""
    m = make(**dict(CONFIGS["default"], d_state=2))
    assert "conv channels 68" in m.fused_layout and m.in_proj.out_features == 136
    with pytest.raises(kp.KernelCheck, match="multiple of 8"), torch.no_grad():
        kp.mamba_split_conv1d_scan_combined(
            m.in_proj(torch.randn(1, 9, D_MODEL)), m.conv1d.weight.squeeze(1), m.conv1d.bias, m.dt_bias,
            -torch.exp(m.A_log), m.D, m.chunk_size, headdim=m.headdim,
        )  # fmt: skip


def test_unusable_fused_function_falls_back_and_says_why(fake_cuda, caplog):
    why = (
        "mamba_split_conv1d_scan_combined cannot run: mamba-ssm 2.2.5 calls causal_conv1d.cpp_functions, ..."
    )
    d_model, kwargs, _, _ = KERNEL_CONFIGS["fused"]
    m = make(d_model, **kwargs)
    x = torch.randn(BATCH, LENGTH, d_model)
    with torch.no_grad():
        want = m(x)
        fake_cuda(kp.stand_in_kernels("mamba2", mamba_split_conv1d_scan_combined=None, fused_reason=why))
        m.use_kernels = "auto"
        with caplog.at_level(logging.INFO, logger="chimera"):
            got = m(x)
            m(x)
    assert kp.conv_layouts == ["channel-last", "channel-last"]  # the aligned view, passed as is
    assert (got - want).abs().max() <= 1e-4
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"mamba2 mixer: using the causal_conv1d_fn + mamba_chunk_scan_combined path: {why}"]


@pytest.mark.parametrize("config", ["fused", "unaligned-groups+hdimD+mlp"])
def test_decoding_under_bf16_autocast_with_fp32_weights_casts_for_causal_conv1d_update(fake_cuda, config):
    d_model, kwargs, _, _ = KERNEL_CONFIGS[config]
    m = make(d_model, **kwargs)
    x = torch.randn(BATCH, 12, d_model)
    with torch.no_grad():
        want = m(x)
        fake_cuda()
        m.use_kernels = "auto"
        state = m.allocate_cache(BATCH, 12)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [m(x[:, :5], state)] + [m(x[:, t : t + 1], state) for t in range(5, 12)]
    assert outs[-1].dtype == torch.bfloat16 and state.conv_state.dtype == torch.float32
    got = torch.cat(outs, 1).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_conv_width_the_kernels_refuse_falls_back_under_auto_and_fails_under_always(fake_cuda, caplog):
    def refuse(*args, **kw):
        raise AssertionError("no kernel may be called for sizes it refuses")

    fake_cuda(SimpleNamespace(**{n: refuse for n in vars(kp.stand_in_kernels("mamba2"))}))
    with pytest.raises(ChimeraError, match="d_conv=5 is outside causal_conv1d's conv widths 2-4"):
        Mamba2(D_MODEL, d_state=16, headdim=8, d_conv=5, use_kernels="always")
    m = make(d_state=16, headdim=8, d_conv=5)
    m.use_kernels = "auto"
    x = torch.randn(1, 9, D_MODEL)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="chimera"):
        got = m(x)
        m.use_kernels = "never"
        assert torch.equal(got, m(x))
    assert any("d_conv=5" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


# --- the probe, against fake installs of mamba-ssm / causal-conv1d ----------------------------------------------


@pytest.fixture
def fresh_probe():
    mixer_kernels.mamba2_kernels.cache_clear()
    yield
    mixer_kernels.mamba2_kernels.cache_clear()


@pytest.mark.parametrize(
    "mamba,conv,backend,why",
    [
        ("2.2.6.post3", "1.5.4", {"causal_conv1d_fwd_function": object()}, ""),
        ("2.2.5", "1.5.0.post8", {"causal_conv1d_fwd_function": None}, r"lacks \(added in 1\.5\.1\)"),
        ("2.2.4", "1.5.1", {"causal_conv1d_cuda": object()}, r"pip install 'mamba-ssm>=2\.2\.5'"),
    ],
)
def test_probe_checks_what_the_fused_function_will_call(monkeypatch, fresh_probe, mamba, conv, backend, why):
    ssd = types.ModuleType("mamba_ssm.ops.triton.ssd_combined")
    ssd.mamba_chunk_scan_combined = kp.mamba_chunk_scan_combined
    ssd.mamba_split_conv1d_scan_combined = kp.mamba_split_conv1d_scan_combined
    for name, value in backend.items():
        setattr(ssd, name, value)
    conv_mod = types.ModuleType("causal_conv1d")
    conv_mod.causal_conv1d_fn, conv_mod.causal_conv1d_update = kp.causal_conv1d_fn, kp.causal_conv1d_update
    monkeypatch.setitem(sys.modules, ssd.__name__, ssd)
    monkeypatch.setitem(sys.modules, "causal_conv1d", conv_mod)
    monkeypatch.setattr(mixer_kernels, "installed_version", {"mamba-ssm": mamba, "causal-conv1d": conv}.get)
    kernels, missing = mixer_kernels.mamba2_kernels()
    assert missing == "" and kernels.mamba_chunk_scan_combined is kp.mamba_chunk_scan_combined
    assert kernels.causal_conv1d_fn is kp.causal_conv1d_fn  # the separate conv works with any pair
    if why:
        assert kernels.mamba_split_conv1d_scan_combined is None
        assert re.search(why, kernels.fused_reason), kernels.fused_reason
    else:
        assert kernels.mamba_split_conv1d_scan_combined is kp.mamba_split_conv1d_scan_combined
        assert kernels.fused_reason == ""


# --- the real CUDA kernels against the PyTorch path (skipped, with the reason, without CUDA or mamba_ssm) ------

KERNEL_CASES = {  # name: (d_model, mixer kwargs, length, fused?)
    "unaligned": (D_MODEL, dict(CONFIGS["default"]), LENGTH, False),  # 4 heads, one partial chunk of 256
    "5heads-chunk32": (40, dict(d_state=16, headdim=16, chunk_size=32), 100, False),  # L not a chunk multiple
    "groups+hdimD+mlp": (D_MODEL, dict(CONFIGS["groups+hdimD+mlp"], chunk_size=32), LENGTH, False),  # 6 heads
    "fused-chunk32": (32, dict(d_state=16, headdim=8, chunk_size=32), 100, True),
    "fused-groups+hdimD+mlp": (
        40,
        dict(KERNEL_CONFIGS["fused-groups+hdimD+mlp"][1], chunk_size=16),
        77,
        True,
    ),
    "fused-no-norm": (32, dict(d_state=16, headdim=8, rmsnorm=False), LENGTH, True),
    "fused-norm-before-gate": (32, dict(d_state=16, headdim=8, norm_before_gate=True), LENGTH, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_cuda_kernels_match_the_torch_path_outputs_and_gradients(case, dtype, monkeypatch):
    skip_without_kernels(mamba2_kernels)
    d_model, kwargs, length, fused = KERNEL_CASES[case]
    kernels = mamba2_kernels()[0]
    assert kernels.mamba_split_conv1d_scan_combined is not None, kernels.fused_reason
    calls = kp.count_calls(kernels, "mamba_split_conv1d_scan_combined", monkeypatch)
    ref = make(d_model, **kwargs)
    kernel_mixer = make(d_model, use_kernels="always", **kwargs)
    assert_kernel_path_matches(ref, kernel_mixer, torch.randn(BATCH, length, d_model), dtype)
    assert (calls[0] > 0) is fused


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["5heads-chunk32", "groups+hdimD+mlp", "fused-chunk32"])
def test_cuda_kernel_decoding_matches_the_torch_forward(case):
    """Prefill (causal_conv1d_fn + mamba_chunk_scan_combined), a continuation from the state, then
    causal_conv1d_update and selective_state_update one token at a time."""
    skip_without_kernels(mamba2_kernels)
    d_model, kwargs, length, _ = KERNEL_CASES[case]
    ref = make(d_model, **kwargs)
    kernel_mixer = make(d_model, use_kernels="always", **kwargs)
    assert_kernel_decoding_matches(ref, kernel_mixer, torch.randn(BATCH, length, d_model), split=20)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fused-chunk32", "5heads-chunk32"])
def test_cuda_kernels_with_seq_idx_match_the_torch_path(case):
    """Packed sequences through the fused function or causal_conv1d_fn + mamba_chunk_scan_combined (fp32)."""
    skip_without_kernels(mamba2_kernels)
    d_model, kwargs, length, _ = KERNEL_CASES[case]
    ref = make(d_model, **kwargs)
    kernel_mixer = make(d_model, use_kernels="always", **kwargs).cuda()
    kernel_mixer.load_state_dict(ref.state_dict())
    lengths = [[length // 3, 1, length - length // 3 - 1], [length - 40, 40]]
    x, seq_idx = torch.randn(2, length, d_model), packed_ids(lengths)
    want = forward_and_grads(ref, x, seq_idx=seq_idx)
    kernel_mixer.zero_grad(set_to_none=True)
    xc = x.cuda().requires_grad_()
    out = kernel_mixer(xc, seq_idx=seq_idx.cuda())
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).cuda()).sum().backward()
    got = {"out": out, "x": xc.grad, **{n: p.grad for n, p in kernel_mixer.named_parameters()}}
    for name, value in want.items():
        err = (got[name].float().cpu() - value).abs().max().item()
        assert err <= 5e-4 * value.abs().max().item() + 1e-6, (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fused-chunk32", "groups+hdimD+mlp"])
def test_cuda_kernel_decoding_under_bf16_autocast_with_fp32_weights(case):
    skip_without_kernels(mamba2_kernels)
    d_model, kwargs, _, _ = KERNEL_CASES[case]
    ref = make(d_model, **kwargs)
    kernel_mixer = make(d_model, use_kernels="always", **kwargs).cuda()
    kernel_mixer.load_state_dict(ref.state_dict())
    x = torch.randn(BATCH, 40, d_model)
    with torch.no_grad():
        want = ref(x)
        state = kernel_mixer.allocate_cache(BATCH, 40)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            xc = x.cuda()
            outs = [kernel_mixer(xc[:, :20], state)] + [
                kernel_mixer(xc[:, t : t + 1], state) for t in range(20, 40)
            ]
    got = torch.cat(outs, 1).float().cpu()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.gpu
def test_cuda_conv_width_the_kernels_refuse_runs_the_torch_path_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref = make(d_state=16, headdim=8, d_conv=5)
    gpu = make(d_state=16, headdim=8, d_conv=5, use_kernels="auto").cuda()
    gpu.load_state_dict(ref.state_dict())
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        assert (gpu(x.cuda()).cpu() - ref(x)).abs().max() <= 1e-3
