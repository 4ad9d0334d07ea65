"""The numba CPU kernels (components/cpu_kernels.py) against the PyTorch path they replace, which is the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("numba")

from components import cpu_kernels  # noqa: E402
from components.decoders.hybrid import _residual, _rms_norm  # noqa: E402
from components.ffn.mlp import SwiGLU  # noqa: E402
from components.mixers.mamba import Mamba  # noqa: E402
from components.mixers.selective_scan import EXP_FLOOR, LOG2E, _scan_inference  # noqa: E402
from toolkit.generate import decode_steps  # noqa: E402
from toolkit.registry import build  # noqa: E402


@pytest.fixture
def no_numba(monkeypatch):
    """Run the PyTorch path: what the process does without numba."""

    def off() -> None:
        monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)

    return off


def _mamba(inner_norms: bool, bias: bool = False) -> Mamba:
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, d_conv=4, expand=2, inner_norms=inner_norms, bias=bias).eval()
    with torch.no_grad():  # norms and biases away from their initial 1 / 0, so a mix-up shows
        for p in m.parameters():
            if p.ndim == 1 and p is not m.D and p is not m.dt_proj.bias:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("inner_norms, bias", [(False, False), (True, True)])
def test_mamba_residual_step_equals_norm_mixer_and_sum_on_the_pytorch_path(inner_norms, bias):
    mixer, norm = _mamba(inner_norms, bias), nn.RMSNorm(32, eps=1e-5)
    nn.init.normal_(norm.weight, 1.0, 0.2)
    prompt, steps = torch.randn(2, 7, 32), torch.randn(5, 2, 1, 32)
    with torch.inference_mode():
        ref_state, got_state = mixer.allocate_cache(2, 12), mixer.allocate_cache(2, 12)
        mixer(prompt, ref_state), mixer(prompt, got_state)
        for x in steps:
            ref = x + mixer(_rms_norm(norm, x), ref_state)  # the torch step (forward has no fused path)
            got = mixer.residual_step(norm, x, got_state)
            assert got is not None and got.shape == (2, 1, 32)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_state.conv_state, ref_state.conv_state, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_state.ssm_state, ref_state.ssm_state, rtol=1e-5, atol=1e-6)
        assert got_state.seqlen_offset == ref_state.seqlen_offset == 12


def test_swiglu_residual_step_equals_norm_ffn_and_sum():
    torch.manual_seed(0)
    ffn, norm = SwiGLU(32, d_ff=48, bias=True).eval(), nn.RMSNorm(32)
    nn.init.normal_(norm.weight, 1.0, 0.2)
    x = torch.randn(3, 1, 32)
    with torch.inference_mode():
        got = ffn.residual_step(norm, x)
        torch.testing.assert_close(got, x + ffn(_rms_norm(norm, x)), rtol=1e-5, atol=1e-5)


def test_the_kernels_decline_what_they_do_not_cover():
    mixer, ffn, norm = _mamba(False), SwiGLU(32, d_ff=48), nn.RMSNorm(32)
    state = mixer.allocate_cache(1, 4)
    x = torch.randn(1, 1, 32)
    assert ffn.residual_step(norm, x) is None  # autograd on: the training path
    with torch.inference_mode():
        assert ffn.residual_step(norm, x.double()) is None  # not fp32
        assert ffn.residual_step(nn.RMSNorm(32, elementwise_affine=False), x) is None  # no weight
        assert ffn.residual_step(nn.LayerNorm(32), x) is None  # another norm
        assert ffn.residual_step(norm, torch.randn(1, cpu_kernels.MAX_ROWS + 1, 32)) is None  # a prefill
        assert mixer.residual_step(norm, torch.randn(1, 2, 32), state) is None  # two tokens
        assert mixer.residual_step(norm, x, None) is None  # no decoding state
        never = Mamba(32, d_state=8, use_kernels="never")
        assert never.residual_step(norm, x, never.allocate_cache(1, 4)) is None

        class Scaled(SwiGLU):  # a plugin that changes the math: the kernel would compute SwiGLU's
            def forward(self, x):
                return 2 * super().forward(x)

        class Stepped(Mamba):
            def _step_torch(self, x, state):
                return 2 * super()._step_torch(x, state)

        assert Scaled(32, d_ff=48).residual_step(norm, x) is None
        stepped = Stepped(32, d_state=8)
        assert stepped.residual_step(norm, x, stepped.allocate_cache(1, 4)) is None


def test_weights_changed_in_place_or_moved_are_seen(no_numba):
    mixer, norm = _mamba(False), nn.RMSNorm(32)
    x = torch.randn(1, 1, 32)

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return mixer.residual_step(norm, x, mixer.allocate_cache(1, 2))

    first = step()
    with torch.no_grad():
        mixer.out_proj.weight.mul_(2.0)  # in place (an optimizer step): the cached views see it
        mixer.A_log.add_(0.5)  # the decays are recomputed from A_log
    second = step()
    mixer.double().float()  # new storage for every parameter: the cache is rebuilt
    third = step()
    no_numba()
    with torch.inference_mode():
        ref = x + mixer(_rms_norm(norm, x), mixer.allocate_cache(1, 2))
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(third, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("floor", [False, True])
def test_inference_scan_equals_the_block_scan(no_numba, floor):
    """Channels split over two threads (an odd width: unequal ranges), an initial state, two rows."""
    torch.manual_seed(0)
    B, L, D, N = 2, 150, 130, 8
    u, delta = torch.randn(B, L, D), torch.rand(B, L, D) * 0.5
    A = -torch.rand(N, D) * (400.0 if floor else 4.0)  # with the floor: decays below exp(-80) occur
    Bm, C, h0 = torch.randn(B, L, N), torch.randn(B, L, N), torch.randn(B, N, D)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            y, h = _scan_inference(u, delta, A, Bm, C, h0, 64, floor)
            no_numba()
            y_ref, h_ref = _scan_inference(u, delta, A, Bm, C, h0, 64, floor)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    assert EXP_FLOOR * LOG2E > -126.0  # the kernel's own clamp is below the floor


def test_exp2_is_within_one_fp32_ulp_of_the_exact_value():
    import numba
    import numpy as np

    from components._numba_kernels import _exp2

    @numba.njit
    def many(x, out):
        for i in range(x.shape[0]):
            out[i] = _exp2(x[i])

    x = np.concatenate([np.linspace(-126.0, 126.0, 200_001), -np.random.default_rng(0).random(100_000) * 30])
    x = x.astype(np.float32)
    out = np.empty_like(x)
    many(x, out)
    exact = np.exp2(x.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 1.2e-7  # fp32's ulp is 2^-23 = 1.19e-7 of the value


@pytest.mark.parametrize("pattern, inner_norms", [("hybrid_1_7", False), ("jamba", True)])
def test_generation_equals_the_pytorch_path(no_numba, pattern, inner_norms):
    """A whole decoder, prefill and greedy decoding, batched: same tokens, logits to fp32 rounding."""
    torch.manual_seed(0)
    node = {
        "name": "hybrid",
        "d_model": 64,
        "n_layers": 8,
        "pattern": pattern,
        "vocab_size": 97,
        "mixers": {"attention": {"n_heads": 4}, "mamba": {"d_state": 8, "inner_norms": inner_norms}},
        "ffns": {"mlp": {}, "moe": {"d_ff": 96, "n_experts": 4, "top_k": 2}},
    }
    decoder = build("decoder", node, "test").eval()
    ids = torch.randint(0, 97, (2, 40))
    with torch.inference_mode():
        got = list(decode_steps(decoder, decoder.embed(ids), max_new_tokens=12))
        no_numba()
        ref = list(decode_steps(decoder, decoder.embed(ids), max_new_tokens=12))
    assert [s.tokens.tolist() for s in got] == [s.tokens.tolist() for s in ref]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)


def test_residual_falls_back_to_norm_sublayer_and_sum():
    """A sub-layer without ``residual_step`` (attention, a plugin) goes through the plain path."""
    norm, linear = nn.RMSNorm(8), nn.Linear(8, 8)
    x = torch.randn(1, 1, 8)
    torch.testing.assert_close(_residual(linear, norm, x), x + linear(norm(x)))


def _scan_twice_on_two_threads() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    u, delta, A = torch.randn(1, 20, 128), torch.rand(1, 20, 128), -torch.rand(4, 128)
    with torch.inference_mode():
        for _ in range(2):
            _scan_inference(
                u, delta, A, torch.randn(1, 20, 4), torch.randn(1, 20, 4), torch.zeros(1, 4, 128), 64, False
            )


def test_scan_runs_in_a_forked_child_after_its_parent_ran_it():
    """The scan's thread pool is per process: a child forked after the parent used it (a fork-started worker)
    gets its own, instead of waiting forever on threads it does not have."""
    import multiprocessing

    threads = torch.get_num_threads()
    try:
        _scan_twice_on_two_threads()
        child = multiprocessing.get_context("fork").Process(target=_scan_twice_on_two_threads)
        child.start()
        child.join(120)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not alive and child.exitcode == 0
    finally:
        torch.set_num_threads(threads)
