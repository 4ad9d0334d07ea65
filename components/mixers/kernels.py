"""Lazy probing of the optional CUDA kernels (``mamba_ssm``, ``causal_conv1d``) and the choice of path per call.

The kernels are never imported when this module is imported: on a CPU-only install ``import mamba_ssm`` fails
(its compiled extension is missing), so ``mamba1_kernels()``/``mamba2_kernels()`` probe once, on first need,
and cache what they found. ``use_kernels`` (``auto``, ``always``, ``never``) is checked at construction by
``check_use_kernels`` and applied per forward by ``select_kernels``, which logs the chosen path once.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from torch import Tensor

from toolkit.errors import ChimeraError

logger = logging.getLogger("chimera")

USE_KERNELS = ("auto", "always", "never")
INSTALL_HINT = "pip install 'chimera-toolkit[gpu]'"

Probe = Callable[[], tuple[SimpleNamespace | None, str]]


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


def check_use_kernels(use_kernels: str, probe: Probe, mixer: str) -> None:
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


def select_kernels(use_kernels: str, probe: Probe, x: Tensor, mixer: str) -> SimpleNamespace | None:
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
    """Log ``"<mixer> mixer: using the <path> path"`` the first time this pair is seen in the process."""
    if (mixer, path) not in _LOGGED:
        _LOGGED.add((mixer, path))
        logger.info("%s mixer: using the %s path", mixer, path)
