"""``chimera bench mixers``: CPU forward+backward timings of the SSM mixers against their references.

- Mamba-1: our mixer vs transformers' ``MambaMixer`` on its pure-PyTorch path (the path it takes without
  ``mamba_ssm``), same weights, B=2, L=512, d_model=256, d_state=16; then ours alone at L=2048 (transformers'
  path needs minutes there: it is not measured, and nothing is extrapolated).
- Mamba-2: the chunked SSD scan (reached through the built mixer's ``ssd``) vs a per-step recurrence kept in
  this module (``_ssd_sequential``) on identical inputs at L=2048, plus the whole Mamba-2 mixer at that length.
  transformers' ``Mamba2Mixer`` is not the baseline: its PyTorch path is itself a chunked SSD, and with
  ``mamba_ssm`` installed it calls the Triton kernels whatever the tensors' device.

Mixers are built through the registry (as a config would build them), never imported from ``components``.

Each pair is timed side by side in one run (alternating), after one warm-up, and the median of the repeats is
reported, so ratios stay honest on a noisy machine. A baseline whose warm-up alone takes more than
``SLOW_S`` seconds is not warmed up again: that first run counts as one of its (fewer) repeats.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from toolkit import registry

SLOW_S = 5.0
TARGET_MAMBA1 = 30.0  # speedup over transformers' slow path at L=512
TARGET_MAMBA2 = 5.0  # speedup over the sequential recurrence at L=2048


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).square().mean().backward()

    return run


def _time_once(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _side_by_side(fns: dict[str, Callable[[], None]], repeats: int, slow_repeats: int = 2) -> dict[str, dict]:
    """Warm each callable up once, then alternate them ``repeats`` times; median seconds and run counts."""
    times: dict[str, list[float]] = {}
    wanted: dict[str, int] = {}
    for name, fn in fns.items():
        warm = _time_once(fn)
        slow = warm > SLOW_S
        times[name] = [warm] if slow else []
        wanted[name] = slow_repeats if slow else repeats
    for _ in range(max(wanted.values())):
        for name, fn in fns.items():
            if len(times[name]) < wanted[name]:
                times[name].append(_time_once(fn))
    return {name: {"s": statistics.median(ts), "runs": len(ts)} for name, ts in times.items()}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers warns that its Mamba falls back to PyTorch: that fallback is the baseline, on purpose."""
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _mamba1(quick: bool, repeats: int) -> dict[str, Any]:
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    batch, d_model, d_state = 2, (64 if quick else 256), 16
    length, long_length = (32, 128) if quick else (512, 2048)
    torch.manual_seed(0)
    ours = registry.build(
        "mixer", {"name": "mamba", "d_state": d_state, "use_kernels": "never"}, "bench.mamba", d_model=d_model
    )
    config = MambaConfig(
        hidden_size=d_model,
        state_size=d_state,
        expand=2,
        conv_kernel=4,
        time_step_rank=ours.dt_rank,
        use_bias=False,
        use_conv_bias=True,
        num_hidden_layers=1,
    )
    theirs = MambaMixer(config, layer_idx=0)
    theirs.load_state_dict(ours.state_dict())  # same names and shapes
    theirs.train()  # its fused kernel would need mamba_ssm; without it the pure-PyTorch scan runs
    x = torch.randn(batch, length, d_model, requires_grad=True)
    res = _side_by_side({"ours": _fwd_bwd(ours, x), "transformers": _fwd_bwd(theirs, x)}, repeats)
    x_long = torch.randn(batch, long_length, d_model, requires_grad=True)
    long = _side_by_side({"ours": _fwd_bwd(ours, x_long)}, repeats)
    return {
        "B": batch,
        "L": length,
        "d_model": d_model,
        "d_state": d_state,
        "ours_s": res["ours"]["s"],
        "transformers_s": res["transformers"]["s"],
        "speedup_vs_transformers": res["transformers"]["s"] / res["ours"]["s"],
        "target_speedup": TARGET_MAMBA1,
        "runs": {"ours": res["ours"]["runs"], "transformers": res["transformers"]["runs"]},
        "L_long": long_length,
        "ours_long_s": long["ours"]["s"],
        "transformers_long_s": None,
        "long_note": (
            f"transformers' MambaMixer not measured at L={long_length}: its pure-PyTorch backward grows "
            "quadratically with L (minutes per step on CPU); no extrapolation is reported"
        ),
    }


def _ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
) -> torch.Tensor:
    """The Mamba-2 recurrence one step per token, in fp32: the baseline of the chunked SSD.

    ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t`` per head, with dt softplus'd.
    x: [B, L, H, P]; dt: [B, L, H] (before dt_bias); A, D, dt_bias: [H]; B, C: [B, L, G, N] -> y [B, L, H, P].
    """
    batch, _, nheads, headdim = x.shape
    per_group = nheads // B.shape[2]
    dt = F.softplus(dt.float() + dt_bias.float())
    A = A.float()
    B = B.float().repeat_interleave(per_group, dim=2)  # [B, L, H, N]
    C = C.float().repeat_interleave(per_group, dim=2)
    h = x.new_zeros(batch, nheads, headdim, B.shape[-1], dtype=torch.float32)
    ys = []
    for x_t, dt_t, b_t, c_t in zip(x.float().unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        decay = torch.exp(dt_t * A)[..., None, None]  # [B, H, 1, 1]
        h = decay * h + (x_t * dt_t.unsqueeze(-1)).unsqueeze(-1) * b_t.unsqueeze(-2)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, c_t))
    return (torch.stack(ys, dim=1) + x.float() * D.float().view(nheads, 1)).to(x.dtype)


def _mamba2(quick: bool, repeats: int) -> dict[str, Any]:
    batch, d_model, d_state, headdim = 2, (64 if quick else 256), (16 if quick else 64), (16 if quick else 64)
    length = 128 if quick else 2048
    torch.manual_seed(0)
    mixer = registry.build(
        "mixer",
        {"name": "mamba2", "d_state": d_state, "headdim": headdim, "use_kernels": "never"},
        "bench.mamba2",
        d_model=d_model,
    )
    nheads = mixer.nheads
    # scan inputs shaped and scaled as the mixer produces them at initialisation
    x = torch.randn(batch, length, nheads, headdim, requires_grad=True)
    dt = torch.randn(batch, length, nheads, requires_grad=True)
    B = torch.randn(batch, length, 1, d_state, requires_grad=True)
    C = torch.randn(batch, length, 1, d_state, requires_grad=True)
    leaves = (x, dt, B, C)

    def scan(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for t in leaves:
                t.grad = None
            mixer.zero_grad(set_to_none=True)  # both scans read A_log, D and dt_bias from the mixer
            fn().square().mean().backward()

        return run

    def sequential() -> torch.Tensor:
        return _ssd_sequential(x, dt, -torch.exp(mixer.A_log.float()), B, C, mixer.D, mixer.dt_bias)

    res = _side_by_side(
        {"chunked": scan(lambda: mixer.ssd(x, dt, B, C)), "sequential": scan(sequential)}, repeats
    )
    u = torch.randn(batch, length, d_model, requires_grad=True)
    whole = _side_by_side({"mixer": _fwd_bwd(mixer, u)}, repeats)
    return {
        "B": batch,
        "L": length,
        "d_model": d_model,
        "d_state": d_state,
        "headdim": headdim,
        "nheads": nheads,
        "chunk": mixer.torch_chunk_size,
        "chunked_s": res["chunked"]["s"],
        "sequential_s": res["sequential"]["s"],
        "speedup_vs_sequential": res["sequential"]["s"] / res["chunked"]["s"],
        "target_speedup": TARGET_MAMBA2,
        "runs": {"chunked": res["chunked"]["runs"], "sequential": res["sequential"]["runs"]},
        "mixer_s": whole["mixer"]["s"],
    }


def run_mixer_bench(quick: bool = False) -> dict[str, Any]:
    """Measure the SSM mixers on CPU (forward + backward, seconds per step) and return a JSON-able dict.

    ``quick`` shrinks every size for a smoke test (seconds instead of minutes).
    """
    import transformers

    repeats = 3
    with torch.device("cpu"), _quiet_transformers():
        mamba1 = _mamba1(quick, repeats)
        mamba2 = _mamba2(quick, repeats)
    return {
        "mamba1": mamba1,
        "mamba2": mamba2,
        "device": "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "quick": quick,
    }


def format_table(result: dict[str, Any]) -> str:
    """A readable text table of ``run_mixer_bench``'s result."""
    m1, m2 = result["mamba1"], result["mamba2"]

    def sec(v: float | None) -> str:
        return "not measured" if v is None else f"{v:.3f} s"

    def target(m: dict[str, Any]) -> str:  # the targets are set for the full sizes only
        return "" if result.get("quick") else f" (target >= {m['target_speedup']:.0f}x)"

    rows = [
        (
            "Mamba-1, ours",
            f"B={m1['B']} L={m1['L']} d={m1['d_model']} N={m1['d_state']}",
            sec(m1["ours_s"]),
            "",
        ),
        (
            "Mamba-1, transformers (slow path)",
            f"B={m1['B']} L={m1['L']} d={m1['d_model']} N={m1['d_state']}",
            sec(m1["transformers_s"]),
            f"ours {m1['speedup_vs_transformers']:.1f}x faster{target(m1)}",
        ),
        ("Mamba-1, ours", f"B={m1['B']} L={m1['L_long']}", sec(m1["ours_long_s"]), ""),
        (
            "Mamba-1, transformers",
            f"B={m1['B']} L={m1['L_long']}",
            sec(m1["transformers_long_s"]),
            "see note",
        ),
        (
            "Mamba-2 scan, chunked SSD",
            f"B={m2['B']} L={m2['L']} H={m2['nheads']} P={m2['headdim']} N={m2['d_state']}",
            sec(m2["chunked_s"]),
            f"chunk {m2['chunk']}",
        ),
        (
            "Mamba-2 scan, sequential reference",
            f"B={m2['B']} L={m2['L']}",
            sec(m2["sequential_s"]),
            f"chunked {m2['speedup_vs_sequential']:.1f}x faster{target(m2)}",
        ),
        ("Mamba-2 mixer (whole layer)", f"B={m2['B']} L={m2['L']} d={m2['d_model']}", sec(m2["mixer_s"]), ""),
    ]
    header = ("what (forward + backward, CPU)", "shape", "median", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [
        f"chimera bench mixers: torch {result['torch']}, transformers {result.get('transformers', '?')}, "
        f"{result['threads']} threads, median of {result['repeats']} (slow baselines: fewer){' [quick]' if result.get('quick') else ''}",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
        "  ".join("-" * w for w in widths).rstrip(),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"note: {m1['long_note']}")
    return "\n".join(lines)
