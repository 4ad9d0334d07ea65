"""Mamba-2 mixer: the chunked SSD path against a per-step reference written here (outputs and gradients),
decoding, mamba_ssm state-dict names, kernel selection (the CUDA path through stand-ins for its kernels)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from components.mixers import mamba2 as mamba2_module
from components.mixers.kernels import mamba2_kernels
from components.mixers.mamba2 import Mamba2, Mamba2State
from components.mixers.ssd import ssd_chunked
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


# --- the CUDA path's plumbing, with stand-ins following mamba_ssm's documented signatures ---------------------


def stub_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                    dt_softplus=False, return_final_states=False):  # fmt: skip
    assert chunk_size == 256 and z is None  # the module's GPU chunk; rmsnorm gating happens outside
    y, last = ssd_ref(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_states, return_final_state=True)
    return (y, last) if return_final_states else y


def stub_conv_fn(x, weight, bias=None, activation=None):
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[
        ..., : x.shape[-1]
    ]
    return F.silu(out)


def stub_conv_update(x, conv_state, weight, bias=None, activation=None):
    conv_state.copy_(torch.cat([conv_state[..., 1:], x.unsqueeze(-1)], dim=-1))
    return F.silu((conv_state * weight).sum(-1) + bias)


def stub_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    # state [B, H, P, N]; x, dt [B, H, P]; A [H, P, N]; B, C [B, G, N]; D, dt_bias [H, P]
    heads_per_group = x.shape[1] // B.shape[1]
    B, C = B.repeat_interleave(heads_per_group, 1), C.repeat_interleave(heads_per_group, 1)
    dt = F.softplus(dt + dt_bias) if dt_softplus else dt + dt_bias
    state.copy_(state * torch.exp(dt.unsqueeze(-1) * A) + (dt * x).unsqueeze(-1) * B.unsqueeze(2))
    return (state * C.unsqueeze(2)).sum(-1) + D * x


STUBS = SimpleNamespace(
    mamba_chunk_scan_combined=stub_chunk_scan,
    causal_conv1d_fn=stub_conv_fn,
    causal_conv1d_update=stub_conv_update,
    selective_state_update=stub_state_update,
)


@pytest.mark.parametrize("config", ["default", "groups+hdimD+mlp"])
def test_kernel_path_computes_the_torch_path_s_math(monkeypatch, config):
    m = make(**CONFIGS[config])
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        torch_full = m(x)
        monkeypatch.setattr(mamba2_module, "select_kernels", lambda *a: STUBS)
        kernel_full = m(x)
        state = m.allocate_cache(BATCH, LENGTH)
        outs = [m(x[:, :20], state), m(x[:, 20:25], state)] + [
            m(x[:, t : t + 1], state) for t in range(25, LENGTH)
        ]
    assert (kernel_full - torch_full).abs().max() <= 1e-4
    assert (torch.cat(outs, dim=1) - torch_full).abs().max() <= 1e-4


# --- the real CUDA kernels against the PyTorch path (skipped, with the reason, without CUDA or mamba_ssm) ------

KERNEL_CASES = {  # name: (d_model, mixer kwargs, length)
    "default": (D_MODEL, dict(CONFIGS["default"]), LENGTH),  # 4 heads, one partial chunk of 256
    "5heads-chunk32": (40, dict(d_state=16, headdim=16, chunk_size=32), 100),  # L not a multiple of the chunk
    "groups+hdimD+mlp": (D_MODEL, dict(CONFIGS["groups+hdimD+mlp"], chunk_size=32), LENGTH),  # 6 heads
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_cuda_kernels_match_the_torch_path_outputs_and_gradients(case, dtype):
    skip_without_kernels(mamba2_kernels)
    d_model, kwargs, length = KERNEL_CASES[case]
    ref = make(d_model, **kwargs)
    kernel_mixer = make(d_model, use_kernels="always", **kwargs)
    assert_kernel_path_matches(ref, kernel_mixer, torch.randn(BATCH, length, d_model), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["5heads-chunk32", "groups+hdimD+mlp"])
def test_cuda_kernel_decoding_matches_the_torch_forward(case):
    """Prefill (causal_conv1d_fn + mamba_chunk_scan_combined), a continuation from the state, then
    causal_conv1d_update and selective_state_update one token at a time."""
    skip_without_kernels(mamba2_kernels)
    d_model, kwargs, length = KERNEL_CASES[case]
    ref = make(d_model, **kwargs)
    kernel_mixer = make(d_model, use_kernels="always", **kwargs)
    assert_kernel_decoding_matches(ref, kernel_mixer, torch.randn(BATCH, length, d_model), split=20)
