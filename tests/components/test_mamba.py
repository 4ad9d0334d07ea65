"""Mamba-1 mixer: exact math (vs a per-step reference written here), parity with transformers' MambaMixer and
JambaMambaMixer, decoding, state-dict names, kernel selection and probing (the CUDA path is exercised on CPU
with strict stand-ins for the kernels, ``kernel_parity.py``; the ``gpu`` tests run the real kernels)."""

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
from components.mixers import mamba as mamba_module
from components.mixers.mamba import Mamba, MambaState
from components.mixers.selective_scan import selective_scan
from tests.components import kernel_parity as kp
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
    m = Mamba(d_model, use_kernels=use_kernels, **{"d_state": 8, **kwargs})
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


# --- the CUDA path's plumbing on CPU: strict stand-ins (kernel_parity.py) with upstream's signatures and checks --


@pytest.fixture
def fake_cuda(monkeypatch):
    """Route CPU tensors as if they were on CUDA, with the stand-ins as the probe's result; returns a setter."""
    monkeypatch.setattr(mixer_kernels, "_on_cuda", lambda x: True)
    monkeypatch.setattr(mixer_kernels, "_LOGGED", set())
    kp.conv_layouts.clear()

    def use(kernels=None, missing=""):
        kernels = kp.stand_in_kernels("mamba") if kernels is None and not missing else kernels
        monkeypatch.setattr(mamba_module, "mamba1_kernels", lambda: (kernels, missing))
        return kernels

    return use


def forward_and_grads(m: Mamba, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out, g = grads(m, x, m)
    return {"out": out, **g}


@pytest.mark.parametrize(
    "d_model,inner_norms,layout",
    [
        (32, False, "channel-first"),  # mamba_inner_fn (it makes xz contiguous: channel-first)
        (32, True, "channel-last"),  # causal_conv1d_fn on the channel-last view (d_inner 64)
        (18, True, "channel-first"),  # d_inner 36: the view would fail the channel-last checks, so a copy
    ],
)
def test_kernel_path_passes_upstream_checks_and_computes_the_torch_path_s_math(
    fake_cuda, d_model, inner_norms, layout
):
    m = make(d_model, inner_norms=inner_norms)
    x = torch.randn(BATCH, LENGTH, d_model)
    want = forward_and_grads(m, x)
    with torch.no_grad():
        state_ref = m.allocate_cache(BATCH, LENGTH)
        torch_steps = [m(x[:, :20], state_ref)] + [m(x[:, t : t + 1], state_ref) for t in range(20, LENGTH)]
    fake_cuda()
    m.use_kernels = "auto"
    got = forward_and_grads(m, x)  # mamba_inner_fn, or causal_conv1d_fn + selective_scan_fn with inner norms
    expected = [layout] if inner_norms else []
    assert kp.conv_layouts == expected
    for name in want:
        assert (got[name] - want[name]).abs().max() <= 1e-4, name
    with torch.no_grad():  # prefill (causal_conv1d_fn + selective_scan_fn), then the one-token kernels
        state = m.allocate_cache(BATCH, LENGTH)
        outs = [m(x[:, :20], state)] + [m(x[:, t : t + 1], state) for t in range(20, LENGTH)]
    assert (torch.cat(outs, 1) - torch.cat(torch_steps, 1)).abs().max() <= 1e-4
    assert (state.ssm_state - state_ref.ssm_state).abs().max() <= 1e-4
    assert torch.equal(state.conv_state, state_ref.conv_state)


def test_unusable_mamba_inner_fn_falls_back_to_the_separate_kernels_and_says_why(fake_cuda, caplog):
    why = "mamba_inner_fn cannot run: mamba-ssm 2.2.5 calls causal_conv1d.cpp_functions, which ..."
    fake_cuda(kp.stand_in_kernels("mamba", mamba_inner_fn=None, inner_reason=why))
    m = make(use_kernels="auto")
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        want = mamba_module.Mamba._forward_torch(m, x, None)
        with caplog.at_level(logging.INFO, logger="chimera"):
            got = m(x)
            m(x)
    assert kp.conv_layouts == ["channel-last", "channel-last"]  # causal_conv1d_fn ran
    assert (got - want).abs().max() <= 1e-4
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"mamba mixer: using the causal_conv1d_fn + selective_scan_fn path: {why}"]


def test_decoding_under_bf16_autocast_with_fp32_weights_casts_for_causal_conv1d_update(fake_cuda):
    """causal_conv1d_update checks conv_state.dtype == x.dtype: the fp32 state meets bf16 activations."""
    m = make()  # fp32 weights, so an fp32 state
    x = torch.randn(BATCH, 12, D_MODEL)
    with torch.no_grad():
        want = m(x)
        with pytest.raises(kp.KernelCheck, match="conv_state dtype"):  # the check the mixer must satisfy
            kp.causal_conv1d_update(
                torch.zeros(BATCH, m.d_inner, dtype=torch.bfloat16),
                m.allocate_cache(BATCH, 1).conv_state,
                m.conv1d.weight.squeeze(1),
            )
        fake_cuda()
        m.use_kernels = "auto"
        state = m.allocate_cache(BATCH, 12)
        assert state.conv_state.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [m(x[:, :5], state)] + [m(x[:, t : t + 1], state) for t in range(5, 12)]
    got = torch.cat(outs, 1).float()
    assert outs[-1].dtype == torch.bfloat16 and state.conv_state.dtype == torch.float32
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # bf16 matmuls


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"d_conv": 5}, "d_conv=5 is outside causal_conv1d's conv widths 2-4"),
        ({"d_state": 300}, "d_state=300"),
    ],
)
def test_sizes_the_kernels_refuse_fall_back_under_auto_and_fail_under_always(
    fake_cuda, caplog, kwargs, reason
):
    def refuse(*args, **kw):
        raise AssertionError("no kernel may be called for sizes it refuses")

    fake_cuda(SimpleNamespace(**{n: refuse for n in vars(kp.stand_in_kernels("mamba"))}))
    with pytest.raises(ChimeraError, match=reason) as err:
        Mamba(D_MODEL, use_kernels="always", **kwargs)
    assert "use_kernels: auto" in str(err.value)
    torch.manual_seed(0)
    m = Mamba(D_MODEL, **kwargs)  # auto
    x = torch.randn(1, 9, D_MODEL)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="chimera"):
        got = m(x)
        m(x)
        want = mamba_module.Mamba._forward_torch(m, x, None)
    assert torch.equal(got, want)
    messages = [r.getMessage() for r in caplog.records if "mamba mixer" in r.getMessage()]
    assert (
        len(messages) == 1
        and reason in messages[0]
        and messages[0].startswith(
            "mamba mixer: using the PyTorch (cpu) path: the CUDA kernels cannot run it"
        )
    )


def test_use_kernels_always_on_cuda_without_kernels_fails_naming_the_probe_s_reason(fake_cuda):
    fake_cuda(None, "mamba_ssm.ops.selective_scan_interface (ModuleNotFoundError: No module named 'x')")
    with pytest.raises(ChimeraError, match="No module named 'x'"):
        Mamba(D_MODEL, use_kernels="always")


# --- the probe, against fake installs of mamba-ssm / causal-conv1d ----------------------------------------------


def fake_install(monkeypatch, mamba: str, conv: str, backend: dict[str, object]) -> None:
    """Fake modules for what ``mamba1_kernels`` imports; ``backend``: what selective_scan_interface's module
    namespace holds for its causal_conv1d backend (``causal_conv1d_fwd_function`` in >= 2.2.5, else
    ``causal_conv1d_cuda``; None when its import failed)."""
    sel = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    sel.selective_scan_fn, sel.mamba_inner_fn = kp.selective_scan_fn, kp.mamba_inner_fn
    for name, value in backend.items():
        setattr(sel, name, value)
    conv_mod = types.ModuleType("causal_conv1d")
    conv_mod.causal_conv1d_fn, conv_mod.causal_conv1d_update = kp.causal_conv1d_fn, kp.causal_conv1d_update
    monkeypatch.setitem(sys.modules, sel.__name__, sel)
    monkeypatch.setitem(sys.modules, "causal_conv1d", conv_mod)
    versions = {"mamba-ssm": mamba, "causal-conv1d": conv}
    monkeypatch.setattr(mixer_kernels, "installed_version", versions.get)


@pytest.fixture
def fresh_probe():
    mixer_kernels.mamba1_kernels.cache_clear()
    yield
    mixer_kernels.mamba1_kernels.cache_clear()


@pytest.mark.parametrize(
    "mamba,conv,backend,why",
    [
        ("2.2.6", "1.5.2", {"causal_conv1d_fwd_function": object()}, ""),
        ("2.3.1", "1.6.1", {"causal_conv1d_fwd_function": object()}, ""),
        ("2.2.4", "1.5.0.post8", {"causal_conv1d_cuda": object()}, ""),
        # 2.2.5+ with causal-conv1d 1.5.0: its try-import of cpp_functions failed, the function is None
        ("2.2.5", "1.5.0.post8", {"causal_conv1d_fwd_function": None}, r"lacks \(added in 1\.5\.1\)"),
        # 2.2.4 with causal-conv1d 1.5.1: imports fine, then calls the compiled fwd with the old arguments
        ("2.2.4", "1.5.1", {"causal_conv1d_cuda": object()}, r"pip install 'mamba-ssm>=2\.2\.5'"),
    ],
)
def test_probe_checks_what_mamba_inner_fn_will_call(monkeypatch, fresh_probe, mamba, conv, backend, why):
    fake_install(monkeypatch, mamba, conv, backend)
    kernels, missing = mixer_kernels.mamba1_kernels()
    assert missing == "" and kernels.selective_scan_fn is kp.selective_scan_fn
    assert kernels.versions == {"mamba_ssm": mamba, "causal_conv1d": conv}
    if why:
        assert kernels.mamba_inner_fn is None and re.search(why, kernels.inner_reason), kernels.inner_reason
        assert (
            f"mamba-ssm {mamba}" in kernels.inner_reason and f"causal-conv1d {conv}" in kernels.inner_reason
        )
    else:
        assert kernels.mamba_inner_fn is kp.mamba_inner_fn and kernels.inner_reason == ""
    report = mixer_kernels.kernel_report()
    assert report["versions"] == kernels.versions and report["mamba1"]["mamba_inner_fn"] is (not why)


def test_probe_reports_a_missing_compiled_extension(monkeypatch, fresh_probe):
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)  # import raises
    kernels, missing = mixer_kernels.mamba1_kernels()
    assert kernels is None and "mamba_ssm.ops.selective_scan_interface" in missing
    # mamba-ssm after 2.3.2 imports without its CUDA scan (selective_scan_cuda = None) and raises when called
    mixer_kernels.mamba1_kernels.cache_clear()
    fake_install(
        monkeypatch, "2.3.3", "1.6.1", {"causal_conv1d_fwd_function": object(), "selective_scan_cuda": None}
    )
    kernels, missing = mixer_kernels.mamba1_kernels()
    assert kernels is None and "MAMBA_KEEP_CUDA_BUILD=TRUE" in missing


def test_conv_input_keeps_a_valid_channel_last_view_and_copies_otherwise():
    conv_input = mixer_kernels.conv_input
    xz = torch.randn(2, 5, 128).transpose(1, 2)  # [B, 128, L], channel-last, strides (640, 1, 128)
    assert conv_input(xz[:, :64]) is not None and conv_input(xz[:, :64]).data_ptr() == xz.data_ptr()
    odd = torch.randn(2, 5, 72).transpose(1, 2)[:, :36]  # 36 channels: the channel-last kernel refuses them
    copy = conv_input(odd)
    assert copy.is_contiguous() and torch.equal(copy, odd)
    assert conv_input(odd, channel_last=True) is None  # seq_idx needs channel-last: impossible here
    base = torch.randn(2, 5, 136).transpose(1, 2)
    shifted = base[:, 2:66]  # 64 channels, strides fine, but it starts 8 bytes in: vector loads need 16
    assert shifted.data_ptr() % 16 == 8 and conv_input(shifted).is_contiguous()
    assert conv_input(base[:, 8:72]).data_ptr() == base.data_ptr() + 32  # 32 bytes in: kept as a view
    cl = conv_input(torch.randn(2, 64, 5), channel_last=True)  # channel-first in, channel-last copy out
    assert cl.stride(1) == 1 and cl.stride(2) == 64
    kp.check_conv_fwd(cl, torch.randn(64, 4), None, torch.zeros(2, 5, dtype=torch.int32))


# --- the real CUDA kernels against the PyTorch path (skipped, with the reason, without CUDA or mamba_ssm) ------

KERNEL_CASES = {  # name: (d_model, inner_norms, length)
    "fused": (32, False, LENGTH),  # mamba_inner_fn, d_inner 64
    "fused-d_inner36": (18, False, 130),  # d_inner 36: not a multiple of 8
    "norms-d_inner64": (32, True, 130),  # causal_conv1d_fn on the channel-last view + selective_scan_fn
    "norms-d_inner36": (18, True, LENGTH),  # causal_conv1d_fn on a channel-first copy (Jamba's inner norms)
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_cuda_kernels_match_the_torch_path_outputs_and_gradients(case, dtype, monkeypatch):
    skip_without_kernels(mixer_kernels.mamba1_kernels)
    d_model, inner_norms, length = KERNEL_CASES[case]
    kernels = mixer_kernels.mamba1_kernels()[0]
    assert kernels.mamba_inner_fn is not None, kernels.inner_reason  # the installed pair must be consistent
    fused = kp.count_calls(kernels, "mamba_inner_fn", monkeypatch)
    ref = make(d_model, inner_norms=inner_norms)
    kernel_mixer = make(d_model, use_kernels="always", inner_norms=inner_norms)
    assert_kernel_path_matches(ref, kernel_mixer, torch.randn(BATCH, length, d_model), dtype)
    assert (fused[0] > 0) is (not inner_norms)


@pytest.mark.gpu
@pytest.mark.parametrize("inner_norms", [False, True])
def test_cuda_kernel_decoding_matches_the_torch_forward(inner_norms):
    """Prefill (causal_conv1d_fn + selective_scan_fn), continuation, then causal_conv1d_update and
    selective_state_update one token at a time."""
    skip_without_kernels(mixer_kernels.mamba1_kernels)
    ref = make(18, inner_norms=inner_norms)
    kernel_mixer = make(18, use_kernels="always", inner_norms=inner_norms)
    assert_kernel_decoding_matches(ref, kernel_mixer, torch.randn(BATCH, LENGTH, 18), split=20)


@pytest.mark.gpu
@pytest.mark.parametrize("d_model", [32, 18])
def test_cuda_kernel_decoding_under_bf16_autocast_with_fp32_weights(d_model):
    """The generation setting of a bf16-mixed model: fp32 weights and state, bf16 activations."""
    skip_without_kernels(mixer_kernels.mamba1_kernels)
    ref = make(d_model)
    kernel_mixer = make(d_model, use_kernels="always").cuda()
    kernel_mixer.load_state_dict(ref.state_dict())
    x = torch.randn(BATCH, 24, d_model)
    with torch.no_grad():
        want = ref(x)
        state = kernel_mixer.allocate_cache(BATCH, 24)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            xc = x.cuda()
            outs = [kernel_mixer(xc[:, :10], state)] + [
                kernel_mixer(xc[:, t : t + 1], state) for t in range(10, 24)
            ]
    got = torch.cat(outs, 1).float().cpu()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.gpu
def test_cuda_sizes_the_kernels_refuse_run_the_torch_path_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for kwargs in ({"d_conv": 5}, {"d_state": 300}):
        ref = make(**kwargs)
        gpu = make(use_kernels="auto", **kwargs).cuda()
        x = torch.randn(BATCH, LENGTH, D_MODEL)
        with torch.no_grad():
            assert (gpu(x.cuda()).cpu() - ref(x)).abs().max() <= 1e-3
        with pytest.raises(ChimeraError, match="cannot run this mixer"):
            make(use_kernels="always", **kwargs)


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
