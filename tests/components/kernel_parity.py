"""The real CUDA kernels (``mamba_ssm``, ``causal_conv1d``) against an SSM mixer's PyTorch path, same weights.

Shared by the ``gpu`` tests of test_mamba.py and test_mamba2.py. A test calls ``skip_without_kernels`` with the
mixer's probe (``components.mixers.kernels.mamba1_kernels`` / ``mamba2_kernels``) before building a mixer with
``use_kernels="always"`` (construction fails without the kernels), then compares that mixer on CUDA with one
built with ``use_kernels="never"`` and run on the CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
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
