"""Mamba-1 mixer: exact math (vs a per-step reference written here), parity with transformers' MambaMixer and
JambaMambaMixer, decoding, state-dict names, kernel selection (the CUDA path is exercised with stand-ins that
follow mamba_ssm's documented signatures)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from components.mixers import kernels as mixer_kernels
from components.mixers import mamba as mamba_module
from components.mixers.mamba import Mamba, MambaState
from components.mixers.selective_scan import selective_scan
from tests.components.kernel_parity import (
    assert_kernel_decoding_matches,
    assert_kernel_path_matches,
    skip_without_kernels,
)
from tests.components.ssm_reference import selective_scan_ref
from toolkit.errors import ChimeraError
from toolkit.registry import build, get

D_MODEL, BATCH, LENGTH = 32, 2, 37  # 37: not a multiple of the scan block


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_forward(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Mamba-1 written out step by step from the paper's recurrence, reading the module's parameters."""
    xz = x @ m.in_proj.weight.T
    xs, z = xz.chunk(2, dim=-1)  # [B, L, D]
    w, width = m.conv1d.weight[:, 0], m.d_conv  # [D, W]
    L = x.shape[1]
    u = []
    for t in range(L):  # causal depthwise conv: output t sees inputs t-W+1 .. t
        acc = m.conv1d.bias.expand(x.shape[0], -1)
        for k in range(width):
            src = t - (width - 1) + k
            if src >= 0:
                acc = acc + w[:, k] * xs[:, src]
        u.append(F.silu(acc))
    u = torch.stack(u, dim=1)
    dt, B, C = torch.split(u @ m.x_proj.weight.T, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    if m.inner_norms:
        eps = m.dt_layernorm.eps
        dt = rms(dt, m.dt_layernorm.weight, eps)
        B = rms(B, m.b_layernorm.weight, eps)
        C = rms(C, m.c_layernorm.weight, eps)
    dt = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias)
    A = -torch.exp(m.A_log)
    h = torch.zeros(x.shape[0], m.d_inner, m.d_state)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        y = (h * C[:, t, None, :]).sum(-1) + m.D * u[:, t]
        ys.append(y * F.silu(z[:, t]))
    return torch.stack(ys, dim=1) @ m.out_proj.weight.T


def make(d_model: int = D_MODEL, use_kernels: str = "never", **kwargs) -> Mamba:
    torch.manual_seed(0)
    m = Mamba(d_model, d_state=8, use_kernels=use_kernels, **kwargs)
    with torch.no_grad():  # non-trivial norms and larger time steps than the init, so every term matters
        if m.inner_norms:
            for norm in (m.dt_layernorm, m.b_layernorm, m.c_layernorm):
                norm.weight.uniform_(0.5, 1.5)
        m.dt_proj.bias.add_(1.0)
        m.D.uniform_(0.5, 1.5)
    return m


def grads(m: Mamba, x: torch.Tensor, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = fn(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    return out.detach(), {"x": x.grad, **{n: p.grad for n, p in m.named_parameters()}}


@pytest.mark.parametrize("inner_norms", [False, True])
def test_matches_sequential_reference_outputs_and_gradients(inner_norms):
    m = make(inner_norms=inner_norms)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    out, g = grads(m, x, m)
    ref, g_ref = grads(m, x, lambda t: reference_forward(m, t))
    assert out.shape == (BATCH, LENGTH, D_MODEL)
    assert (out - ref).abs().max() <= 1e-4
    assert g.keys() == g_ref.keys()
    for name in g:
        assert g[name] is not None, name
        assert (g[name] - g_ref[name]).abs().max() <= 1e-4, name


def test_scan_function_matches_its_reference_with_initial_state_and_last_state():
    """The blocked scan (several blocks, a partial last one) against the per-step reference run in fp64."""
    torch.manual_seed(0)
    Bsz, L, D, N = 2, 70, 6, 4
    u, dt, z = torch.randn(Bsz, L, D), torch.randn(Bsz, L, D), torch.randn(Bsz, L, D)
    A, Bm, C = -torch.rand(D, N) * 3, torch.randn(Bsz, L, N), torch.randn(Bsz, L, N)
    Dp, bias, h0 = torch.randn(D), torch.randn(D), torch.randn(Bsz, D, N)
    inputs = [u, dt, A, Bm, C, Dp, z, bias, h0]
    results = []
    for fn, dtype in ((selective_scan, torch.float32), (selective_scan_ref, torch.float64)):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in inputs]
        *args, h = leaves
        y, last = fn(*args, delta_softplus=True, initial_state=h, return_last_state=True)
        (y.sin().sum() + (last * 0.5).sum()).backward()
        results.append([y, last] + [t.grad for t in leaves])
    for ours, ref in zip(*results):  # gradients summed over B*L terms reach ~500: compare relative to scale
        assert (ours.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_matches_transformers_mamba_mixer():
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    m = make()
    config = MambaConfig(
        hidden_size=D_MODEL,
        state_size=m.d_state,
        expand=2,
        conv_kernel=m.d_conv,
        time_step_rank=m.dt_rank,
        use_bias=False,
        use_conv_bias=True,
        num_hidden_layers=1,
    )
    theirs = MambaMixer(config, layer_idx=0).eval()  # no mamba_ssm here: its pure-PyTorch slow path runs
    theirs.load_state_dict(m.state_dict())  # names and shapes match
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        assert (m(x) - theirs(x)).abs().max() <= 1e-4


def test_inner_norms_match_transformers_jamba_mixer():
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer

    m = make(inner_norms=True, dt_rank=4)
    config = JambaConfig(
        hidden_size=D_MODEL,
        mamba_d_state=m.d_state,
        mamba_d_conv=m.d_conv,
        mamba_expand=2,
        mamba_dt_rank=4,
        rms_norm_eps=1e-6,
        num_hidden_layers=1,
    )
    theirs = JambaMambaMixer(config, layer_idx=0).eval()
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in m.parameters())
    theirs.load_state_dict(m.state_dict())
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        assert (m(x) - theirs(x)).abs().max() <= 1e-4


@pytest.mark.parametrize("inner_norms", [False, True])
def test_prefill_then_steps_equal_full_forward(inner_norms):
    m = make(inner_norms=inner_norms)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_cache(BATCH, 64)
        assert isinstance(state, MambaState)
        assert state.conv_state.shape == (BATCH, m.d_inner, m.d_conv)
        assert state.ssm_state.shape == (BATCH, m.d_inner, m.d_state)
        # a prefill, then a second chunk continuing from it, then one token at a time
        outs = [m(x[:, :10], state), m(x[:, 10:12], state)]
        outs += [m(x[:, t : t + 1], state) for t in range(12, LENGTH)]
        assert state.seqlen_offset == LENGTH
    assert (torch.cat(outs, dim=1) - full).abs().max() <= 1e-4


def test_state_dict_names_and_shapes_are_mamba_ssm_s():
    m = Mamba(64, d_state=16, d_conv=4, expand=2)  # dt_rank auto = ceil(64 / 16) = 4, d_inner 128
    expected = {
        "in_proj.weight": (256, 64),
        "conv1d.weight": (128, 1, 4),
        "conv1d.bias": (128,),
        "x_proj.weight": (4 + 2 * 16, 128),
        "dt_proj.weight": (128, 4),
        "dt_proj.bias": (128,),
        "A_log": (128, 16),
        "D": (128,),
        "out_proj.weight": (64, 128),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    jamba = Mamba(64, dt_rank=8, inner_norms=True)
    extra = set(jamba.state_dict()) - set(expected)
    assert extra == {"dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight"}
    # the state dict round-trips into a fresh module and reproduces the outputs
    other = Mamba(64, d_state=16)
    other.load_state_dict(m.state_dict())
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.equal(other(x), m(x))


def test_initialisation_follows_mamba_ssm():
    m = Mamba(64, d_state=16, dt_min=0.001, dt_max=0.1)
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, -1))
    assert torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    with torch.device("meta"):  # `chimera describe` builds on the meta device
        big = Mamba(4096, dt_rank=256, inner_norms=True)
    assert big.A_log.is_meta
    assert sum(p.numel() for p in big.parameters()) == 105_308_448
    with torch.device("meta"):
        small = Mamba(64, d_state=16, inner_norms=True)
    small.to_empty(device="cpu")  # how a sharded model is materialised
    small.reset_parameters()
    assert torch.equal(small.A_log, m.A_log) and torch.equal(small.D, m.D)
    assert torch.equal(small.dt_layernorm.weight, torch.ones(4))
    assert F.softplus(small.dt_proj.bias).min() >= 0.001 * 0.999


def test_use_kernels_always_without_kernels_fails_at_construction(monkeypatch):
    monkeypatch.setattr(
        mamba_module,
        "mamba1_kernels",
        lambda: (None, "mamba_ssm (ModuleNotFoundError: No module named 'mamba_ssm')"),
    )
    with pytest.raises(ChimeraError) as err:
        Mamba(D_MODEL, use_kernels="always")
    assert "mamba_ssm" in str(err.value) and "pip install 'chimera-toolkit[gpu]'" in str(err.value)
    with pytest.raises(ChimeraError):  # through the registry too (a user error: one line in the CLI)
        build("mixer", {"name": "mamba", "use_kernels": "always"}, d_model=D_MODEL)
    with pytest.raises(ValueError, match="use_kernels"):
        Mamba(D_MODEL, use_kernels="sometimes")


def test_use_kernels_auto_on_cpu_runs_the_torch_path_and_says_so(monkeypatch, caplog):
    def no_probe():
        raise AssertionError("the kernels must not be probed for CPU tensors")

    monkeypatch.setattr(mamba_module, "mamba1_kernels", no_probe)
    monkeypatch.setattr(mixer_kernels, "_LOGGED", set())
    m = Mamba(D_MODEL, d_state=4)  # auto
    with caplog.at_level(logging.INFO, logger="chimera"):
        m(torch.randn(1, 3, D_MODEL))
        m(torch.randn(1, 3, D_MODEL))
    messages = [r.getMessage() for r in caplog.records if "mamba mixer" in r.getMessage()]
    assert messages == ["mamba mixer: using the PyTorch (cpu) path"]  # logged once


def test_registered_with_pattern_letter():
    entry = get("mixer", "mamba")
    assert entry.target is Mamba and entry.symbol == "m"
    m = build("mixer", {"name": "mamba", "d_state": 4}, d_model=D_MODEL, layer_idx=3)
    assert m.layer_idx == 3 and m.d_state == 4


# --- the CUDA path's plumbing, with stand-ins for mamba_ssm / causal_conv1d (their documented layouts) -------


def stub_causal_conv1d_fn(x, weight, bias=None, activation=None):  # x [B, D, L], weight [D, W]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[
        ..., : x.shape[-1]
    ]
    return F.silu(out) if activation == "silu" else out


def stub_causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):  # x [B, D], state [B, D, W]
    conv_state.copy_(torch.cat([conv_state[..., 1:], x.unsqueeze(-1)], dim=-1))
    out = (conv_state * weight).sum(-1) + (bias if bias is not None else 0)
    return F.silu(out) if activation == "silu" else out


def stub_selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    # u, delta, z: [B, D, L]; B, C: [B, N, L]
    assert u.shape == delta.shape and B.shape[-1] == u.shape[-1] and B.shape[1] == A.shape[1]
    t = lambda v: None if v is None else v.transpose(1, 2)  # noqa: E731
    y, last = selective_scan_ref(
        t(u), t(delta), A, t(B), t(C), D, t(z), delta_bias, delta_softplus, return_last_state=True
    )
    return (t(y), last) if return_last_state else t(y)


def stub_mamba_inner_fn(
    xz, conv_w, conv_b, x_proj_w, delta_proj_w, out_proj_w, out_proj_b, A, B, C, D, delta_bias, delta_softplus
):
    x, z = xz.chunk(2, dim=1)
    x = stub_causal_conv1d_fn(x, conv_w[:, 0], conv_b, "silu")
    rank, n = delta_proj_w.shape[1], A.shape[1]
    dt, Bm, Cm = torch.split(x.transpose(1, 2) @ x_proj_w.T, [rank, n, n], dim=-1)
    delta = (dt @ delta_proj_w.T).transpose(1, 2)
    y = stub_selective_scan_fn(
        x, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), D, z, delta_bias, delta_softplus
    )
    return F.linear(y.transpose(1, 2), out_proj_w, out_proj_b)


def stub_selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    dt = F.softplus(dt + dt_bias) if dt_softplus else dt + dt_bias
    state.copy_(state * torch.exp(dt.unsqueeze(-1) * A) + (dt * x).unsqueeze(-1) * B.unsqueeze(1))
    return ((state * C.unsqueeze(1)).sum(-1) + D * x) * F.silu(z)


STUBS = SimpleNamespace(
    causal_conv1d_fn=stub_causal_conv1d_fn,
    causal_conv1d_update=stub_causal_conv1d_update,
    selective_scan_fn=stub_selective_scan_fn,
    mamba_inner_fn=stub_mamba_inner_fn,
    selective_state_update=stub_selective_state_update,
)


@pytest.mark.parametrize("inner_norms", [False, True])
def test_kernel_path_computes_the_torch_path_s_math(monkeypatch, inner_norms):
    m = make(inner_norms=inner_norms)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        torch_full = m(x)
        monkeypatch.setattr(mamba_module, "select_kernels", lambda *a: STUBS)
        kernel_full = m(x)  # training path: mamba_inner_fn, or conv + scan with inner norms
        state = m.allocate_cache(BATCH, LENGTH)
        outs = [m(x[:, :20], state)] + [m(x[:, t : t + 1], state) for t in range(20, LENGTH)]
    assert (kernel_full - torch_full).abs().max() <= 1e-4
    assert (torch.cat(outs, dim=1) - torch_full).abs().max() <= 1e-4


# --- the real CUDA kernels against the PyTorch path (skipped, with the reason, without CUDA or mamba_ssm) ------

KERNEL_CASES = {  # name: (d_model, inner_norms, length)
    "fused": (32, False, LENGTH),  # mamba_inner_fn, d_inner 64
    "fused-d_inner36": (18, False, 130),  # d_inner 36: not a multiple of 8
    "norms-d_inner36": (18, True, LENGTH),  # causal_conv1d_fn + selective_scan_fn (Jamba's inner norms)
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_cuda_kernels_match_the_torch_path_outputs_and_gradients(case, dtype):
    skip_without_kernels(mixer_kernels.mamba1_kernels)
    d_model, inner_norms, length = KERNEL_CASES[case]
    ref = make(d_model, inner_norms=inner_norms)
    kernel_mixer = make(d_model, use_kernels="always", inner_norms=inner_norms)
    assert_kernel_path_matches(ref, kernel_mixer, torch.randn(BATCH, length, d_model), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("inner_norms", [False, True])
def test_cuda_kernel_decoding_matches_the_torch_forward(inner_norms):
    """Prefill (causal_conv1d_fn + selective_scan_fn), continuation, then causal_conv1d_update and
    selective_state_update one token at a time."""
    skip_without_kernels(mixer_kernels.mamba1_kernels)
    ref = make(18, inner_norms=inner_norms)
    kernel_mixer = make(18, use_kernels="always", inner_norms=inner_norms)
    assert_kernel_decoding_matches(ref, kernel_mixer, torch.randn(BATCH, LENGTH, 18), split=20)


def test_mixer_bench_quick_runs_and_formats():
    from toolkit.bench_mixers import format_table, run_mixer_bench

    result = run_mixer_bench(quick=True)
    m1, m2 = result["mamba1"], result["mamba2"]
    assert result["device"] == "cpu" and result["threads"] >= 1 and result["torch"] == torch.__version__
    assert m1["ours_s"] > 0 and m1["transformers_s"] > 0 and m1["transformers_long_s"] is None
    assert m1["speedup_vs_transformers"] == pytest.approx(m1["transformers_s"] / m1["ours_s"])
    assert m2["chunked_s"] > 0 and m2["sequential_s"] > 0 and m2["mixer_s"] > 0
    table = format_table(result)
    assert "Mamba-1" in table and "Mamba-2" in table and "not measured" in table
