"""Lazy probing of the optional CUDA kernels (``mamba_ssm``, ``causal_conv1d``) and the choice of path per call.

The kernels are never imported when this module is imported: on a CPU-only install ``import mamba_ssm`` fails
(its compiled extension is missing), so ``mamba1_kernels()``/``mamba2_kernels()`` probe once, on first need,
and cache what they found. ``use_kernels`` (``auto``, ``always``, ``never``) is checked at construction by
``check_use_kernels`` and applied per forward by ``select_kernels``, which logs the chosen path once.

What the probes check (read from the mamba-ssm 2.2.x/2.3.x and causal-conv1d 1.4-1.6 sources):

- the functions the mixers call import, and so do the ones *those* call: mamba-ssm >= 2.2.5 imports
  ``causal_conv1d.cpp_functions`` (new in causal-conv1d 1.5.1) inside a ``try``; without it ``mamba_inner_fn``
  and ``mamba_split_conv1d_scan_combined`` import fine and fail when called. mamba-ssm <= 2.2.4 calls the
  compiled ``causal_conv1d_cuda.causal_conv1d_fwd`` with the 7 arguments of causal-conv1d < 1.5.1; 1.5.1 added
  an ``out`` argument, so that pair fails when called too. Both mismatches make the fused function unusable
  (its reason is kept); the mixers then use the separate kernels (``causal_conv1d_fn`` + the scan).
- shape limits the kernels check only when called (``kernel_limits``): ``causal_conv1d`` takes conv widths 2-4,
  Mamba-1's ``selective_scan_cuda`` a state size <= 256. ``use_kernels: auto`` falls back to the PyTorch path
  (logged once, with the reason); ``always`` raises at construction, saying why.
- layouts (``conv_input``): ``causal_conv1d_fn`` reads a [B, C, L] tensor either channel-first (stride(2) == 1;
  no constraint on C or L) or channel-last (stride(1) == 1; its C++ checks C % 8 == 0 and strides 0 and 2
  multiples of 8, and its vector loads assume a 16-byte aligned start). ``seq_idx`` (packed sequences) exists
  only in the channel-last kernel.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from toolkit.errors import ChimeraError

logger = logging.getLogger("chimera")

USE_KERNELS = ("auto", "always", "never")
INSTALL_HINT = "pip install 'chimera-toolkit[gpu]'"
# mamba-ssm >= this imports causal_conv1d.cpp_functions, which causal-conv1d >= CONV_CPP_FUNCTIONS provides; an
# older mamba-ssm calls the compiled causal_conv1d_fwd with the arguments causal-conv1d changed in that release
MAMBA_CPP_FUNCTIONS = "2.2.5"
CONV_CPP_FUNCTIONS = "1.5.1"
CONV_WIDTHS = (2, 4)  # causal_conv1d: "causal_conv1d only supports width between 2 and 4"
MAMBA1_MAX_D_STATE = 256  # selective_scan_cuda: "selective_scan only supports state dimension <= 256"
# mamba_ssm's gated RMSNorm (layernorm_gated._layer_norm_fwd) raises above 64 KB per group: 16384 fp32 values
FUSED_NORM_MAX_GROUP = 65536 // 4

Probe = Callable[[], tuple[SimpleNamespace | None, str]]


def _try_import(module: str, names: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """Import ``names`` from ``module``; any failure (ImportError, missing CUDA extension, undefined symbol)
    becomes a reason string instead of an exception."""
    try:
        mod = importlib.import_module(module)
        return {n: getattr(mod, n) for n in names}, ""
    except Exception as exc:  # noqa: BLE001 - a broken compiled extension raises all sorts of errors
        return {}, f"{module} ({type(exc).__name__}: {exc})"


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (``mamba-ssm``, ``causal-conv1d``), without importing it."""
    from importlib import metadata

    for name in (dist, dist.replace("-", "_")):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _older(version: str, than: str) -> bool:
    """``version < than`` by release numbers (2.2.6.post3 is 2.2.6; local tags like +cu12torch2.4 ignored)."""
    try:
        from packaging.version import Version

        return Version(version).release < Version(than).release
    except Exception:  # noqa: BLE001 - an unparsable version: compare the leading integers

        def nums(v: str) -> tuple[int, ...]:
            out = []
            for part in v.split("+")[0].split("."):
                digits = "".join(ch for ch in part if ch.isdigit())
                if not digits or not part[0].isdigit():
                    break
                out.append(int(digits))
            return tuple(out)

        return nums(version) < nums(than)


def version_mismatch(mamba_version: str | None, conv_version: str | None) -> str:
    """Why this (mamba-ssm, causal-conv1d) pair cannot run mamba-ssm's fused functions, or ""."""
    if mamba_version is None or conv_version is None:
        return ""
    new_mamba = not _older(mamba_version, MAMBA_CPP_FUNCTIONS)
    new_conv = not _older(conv_version, CONV_CPP_FUNCTIONS)
    if new_mamba and not new_conv:
        return (
            f"mamba-ssm {mamba_version} calls causal_conv1d.cpp_functions, which causal-conv1d {conv_version} "
            f"lacks (added in {CONV_CPP_FUNCTIONS}): pip install 'causal-conv1d>={CONV_CPP_FUNCTIONS}'"
        )
    if new_conv and not new_mamba:
        return (
            f"mamba-ssm {mamba_version} calls causal_conv1d_cuda.causal_conv1d_fwd with the arguments of "
            f"causal-conv1d < {CONV_CPP_FUNCTIONS}, which causal-conv1d {conv_version} changed: "
            f"pip install 'mamba-ssm>={MAMBA_CPP_FUNCTIONS}'"
        )
    return ""


def _fused_backend(module: str, what: str, versions: dict[str, str | None]) -> str:
    """Why ``module``'s fused function cannot run (its causal_conv1d backend), or "".

    mamba-ssm >= 2.2.5 holds ``causal_conv1d_fwd_function`` (None when its import of causal_conv1d.cpp_functions
    failed); <= 2.2.4 holds ``causal_conv1d_cuda``, whose call only the versions tell apart. The fused function
    imports either way and fails only when called, so look at what it will call.
    """
    mod = importlib.import_module(module)
    why = version_mismatch(versions["mamba_ssm"], versions["causal_conv1d"])
    if hasattr(mod, "causal_conv1d_fwd_function"):
        if mod.causal_conv1d_fwd_function is not None:
            return ""
        return f"{what} cannot run: {module}.causal_conv1d_fwd_function is None; " + (
            why or "causal_conv1d.cpp_functions did not import (causal-conv1d >= 1.5.1 built for this torch?)"
        )
    if hasattr(mod, "causal_conv1d_cuda") and mod.causal_conv1d_cuda is None:
        return f"{what} cannot run: {module}.causal_conv1d_cuda is None" + (f"; {why}" if why else "")
    return f"{what} cannot run: {why}" if why else ""


def _versions() -> dict[str, str | None]:
    return {"mamba_ssm": installed_version("mamba-ssm"), "causal_conv1d": installed_version("causal-conv1d")}


@functools.cache
def mamba1_kernels() -> tuple[SimpleNamespace | None, str]:
    """The Mamba-1 CUDA kernels, probed once: ``(functions, "")`` or ``(None, "what is missing")``.

    Needs ``selective_scan_fn`` (mamba_ssm) and ``causal_conv1d_fn``/``causal_conv1d_update`` (causal_conv1d).
    ``mamba_inner_fn`` (conv, projections and scan fused, recomputed in backward) is used when it can run, else
    None with the reason in ``inner_reason``; ``selective_state_update`` (Triton) is optional (the one-token step
    then runs in PyTorch).
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
    sel = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    if hasattr(sel, "selective_scan_cuda") and sel.selective_scan_cuda is None:
        # mamba-ssm after 2.3.2 builds its CUDA scan only on request; selective_scan_fn then raises when called
        return None, (
            "mamba_ssm was installed without its CUDA selective scan (selective_scan_cuda): reinstall with "
            "MAMBA_KEEP_CUDA_BUILD=TRUE pip install --no-build-isolation mamba-ssm"
        )
    versions = _versions()
    inner_reason = _fused_backend("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn", versions)
    if inner_reason:
        found["mamba_inner_fn"] = None
    fns, _ = _try_import("mamba_ssm.ops.triton.selective_state_update", ("selective_state_update",))
    found["selective_state_update"] = fns.get("selective_state_update")
    return SimpleNamespace(**found, inner_reason=inner_reason, versions=versions), ""


@functools.cache
def mamba2_kernels() -> tuple[SimpleNamespace | None, str]:
    """The Mamba-2 kernels, probed once: ``mamba_chunk_scan_combined`` (Triton, from ``mamba_ssm``) is required.

    ``mamba_split_conv1d_scan_combined`` (conv, scan, gated RMSNorm and out_proj fused, recomputed in backward:
    upstream's training path) is used when it can run, else None with the reason in ``fused_reason``;
    ``causal_conv1d`` and ``selective_state_update`` are used when present.
    """
    fns, why = _try_import(
        "mamba_ssm.ops.triton.ssd_combined", ("mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined")
    )
    if why:
        return None, why
    found = dict(fns)
    versions = _versions()
    fused_reason = _fused_backend(
        "mamba_ssm.ops.triton.ssd_combined", "mamba_split_conv1d_scan_combined", versions
    )
    if fused_reason:
        found["mamba_split_conv1d_scan_combined"] = None
    conv, conv_why = _try_import("causal_conv1d", ("causal_conv1d_fn", "causal_conv1d_update"))
    found["causal_conv1d_fn"] = conv.get("causal_conv1d_fn")
    found["causal_conv1d_update"] = conv.get("causal_conv1d_update")
    if conv_why and not fused_reason:
        fused_reason = f"mamba_split_conv1d_scan_combined needs causal_conv1d: {conv_why}"
        found["mamba_split_conv1d_scan_combined"] = None
    step, _ = _try_import("mamba_ssm.ops.triton.selective_state_update", ("selective_state_update",))
    found["selective_state_update"] = step.get("selective_state_update")
    return SimpleNamespace(**found, fused_reason=fused_reason, versions=versions), ""


def kernel_report() -> dict[str, Any]:
    """What the probes found, as plain data (for ``chimera bench gpu``): versions, each mixer's status, reasons."""
    report: dict[str, Any] = {"versions": _versions(), "cuda": torch.cuda.is_available()}
    for name, probe, optional in (
        ("mamba1", mamba1_kernels, ("mamba_inner_fn", "selective_state_update")),
        (
            "mamba2",
            mamba2_kernels,
            (
                "mamba_split_conv1d_scan_combined",
                "causal_conv1d_fn",
                "causal_conv1d_update",
                "selective_state_update",
            ),
        ),
    ):
        kernels, missing = probe()
        entry: dict[str, Any] = {"usable": kernels is not None, "reason": missing}
        if kernels is not None:
            entry.update({fn: getattr(kernels, fn) is not None for fn in optional})
            entry["fused_reason"] = getattr(kernels, "inner_reason", "") or getattr(
                kernels, "fused_reason", ""
            )
        report[name] = entry
    return report


def kernel_limits(mixer: str, *, d_conv: int, d_state: int | None = None) -> str:
    """Why these sizes are outside what the CUDA kernels accept, or "" (checked before any kernel is called)."""
    lo, hi = CONV_WIDTHS
    reasons = []
    if not lo <= d_conv <= hi:
        reasons.append(f"d_conv={d_conv} is outside causal_conv1d's conv widths {lo}-{hi}")
    if d_state is not None and d_state > MAMBA1_MAX_D_STATE:
        reasons.append(f"d_state={d_state} is above selective_scan's limit of {MAMBA1_MAX_D_STATE}")
    return "; ".join(reasons)


def check_use_kernels(use_kernels: str, probe: Probe, mixer: str, limits: str = "") -> None:
    """Validate ``use_kernels`` at construction; ``"always"`` fails here when the kernels cannot be imported or
    the sizes are outside their ``limits`` (from ``kernel_limits``), naming the gap.

    ``"auto"`` and ``"never"`` import nothing (the probe runs on the first forward with CUDA tensors).
    """
    if use_kernels not in USE_KERNELS:
        raise ValueError(f"use_kernels must be one of {', '.join(USE_KERNELS)}; got {use_kernels!r}")
    if use_kernels == "always":
        if limits:
            raise ChimeraError(
                f"{mixer}: use_kernels='always' but the CUDA kernels cannot run this mixer: {limits}. "
                f"Change the size, or set use_kernels: auto (the PyTorch path then runs it, also on CUDA)"
            )
        kernels, missing = probe()
        if kernels is None:
            raise ChimeraError(
                f"{mixer}: use_kernels='always' but the CUDA kernels cannot be imported: {missing}. "
                f"Install them with `{INSTALL_HINT}` on a CUDA machine, or set use_kernels: auto"
            )


def _on_cuda(x: Tensor) -> bool:
    """Whether ``x`` lives on a CUDA device (a function so CPU tests can pretend)."""
    return x.is_cuda


def select_kernels(
    use_kernels: str, probe: Probe, x: Tensor, mixer: str, limits: str = ""
) -> SimpleNamespace | None:
    """The kernels to use for this call, or None for the PyTorch path; logs the chosen path (and why) once.

    ``limits`` (from ``kernel_limits``, or a per-call reason such as an unsupported layout) sends ``auto`` to the
    PyTorch path and makes ``always`` raise.
    """
    torch_path = f"PyTorch ({x.device.type})"
    if use_kernels == "never":
        log_path_once(mixer, torch_path)
        return None
    if not _on_cuda(x):
        if use_kernels == "always":
            raise ChimeraError(
                f"{mixer}: use_kernels='always' needs CUDA tensors, got a tensor on {x.device}"
            )
        log_path_once(mixer, torch_path)
        return None
    if limits:
        if use_kernels == "always":
            raise ChimeraError(
                f"{mixer}: use_kernels='always' but the CUDA kernels cannot run this call: {limits}"
            )
        log_path_once(mixer, torch_path, f"the CUDA kernels cannot run it: {limits}", logging.WARNING)
        return None
    kernels, missing = probe()
    if kernels is None:
        log_path_once(mixer, torch_path, f"the CUDA kernels cannot be imported: {missing}", logging.WARNING)
        return None
    log_path_once(mixer, "CUDA kernels (mamba_ssm)")
    return kernels


_LOGGED: set[tuple[str, str]] = set()


def log_path_once(mixer: str, path: str, reason: str = "", level: int = logging.INFO) -> None:
    """Log ``"<mixer> mixer: using the <path> path[: <reason>]"`` the first time this message is seen."""
    message = f"{mixer} mixer: using the {path} path" + (f": {reason}" if reason else "")
    if (mixer, message) not in _LOGGED:
        _LOGGED.add((mixer, message))
        logger.log(level, "%s", message)


def conv_input(x: Tensor, channel_last: bool = False) -> Tensor | None:
    """x [B, C, L] (any strides) as ``causal_conv1d_fn`` accepts it, copying only when needed.

    A channel-last view (stride(1) == 1) is kept when the kernel's checks pass (C % 8 == 0, strides 0 and 2
    multiples of 8, a 16-byte aligned start); otherwise a contiguous channel-first copy, which has no such
    constraint. ``channel_last=True`` (needed for ``seq_idx``) returns a channel-last tensor: the view, or a
    channel-last copy when C % 8 == 0, else None (the kernel cannot take it).
    """
    batch, channels, length = x.shape
    if x.stride(1) == 1 and x.stride(2) > 1:  # causal_conv1d's own test for its channel-last kernel
        if channels % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0:
            return x
    elif not channel_last and x.is_contiguous():
        return x
    if channel_last:
        return x.transpose(1, 2).contiguous().transpose(1, 2) if channels % 8 == 0 else None
    return x.contiguous()
