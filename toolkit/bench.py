"""``chimera bench``: benchmarks users run on their own hardware. Each prints its figures with the command
that made them and compares in one run (ratios), because shared machines are noisy.

- ``mixers``: Mamba-1 / Mamba-2 CPU paths against their references (see ``bench_mixers.py``), and prefill time
  of a 1:7 hybrid against a Transformer of equal width and depth as the prompt grows.
- ``model``: the toolkit's Lightning training step against a plain PyTorch loop on the same model and batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _decoder(pattern: str, d_model: int, n_layers: int, device: str):
    from toolkit.registry import build

    node = {
        "name": "hybrid",
        "d_model": d_model,
        "n_layers": n_layers,
        "pattern": pattern,
        "vocab_size": 256,
        "mixers": {"attention": {"n_heads": max(1, d_model // 64)}, "mamba": {"d_state": 16}},
        "ffns": {"mlp": {}},
    }
    return build("decoder", node, "bench.decoder").to(device).eval()


def bench_prefill(
    lengths: Sequence[int] = (1024, 4096, 16384), d_model: int = 128, n_layers: int = 8, device: str | None = None
) -> dict[str, Any]:
    """Prefill (one forward over the prompt, no grad) of ``hybrid_1_7`` vs ``transformer``, B=1."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    hybrid = _decoder("hybrid_1_7", d_model, n_layers, device)
    transformer = _decoder("transformer", d_model, n_layers, device)
    out: dict[str, Any] = {"d_model": d_model, "n_layers": n_layers, "hybrid_pattern": hybrid.pattern, "by_length": {}}
    for L in lengths:
        x = torch.randn(1, L, d_model, device=device)
        repeats = 3 if L <= 4096 else 1
        with torch.no_grad():
            t_h = timed(lambda: hybrid(x), repeats=repeats)
            t_t = timed(lambda: transformer(x), repeats=repeats)
        out["by_length"][str(L)] = {"hybrid_s": t_h, "transformer_s": t_t, "hybrid_over_transformer": t_h / t_t}
    return out


def bench_mixers(quick: bool = False) -> dict[str, Any]:
    """Everything ``chimera bench mixers`` reports, under stable keys scripts can read."""
    from toolkit.bench_mixers import run_mixer_bench

    result = run_mixer_bench(quick=quick)
    prefill = bench_prefill(lengths=(256, 512, 1024) if quick else (1024, 4096, 16384), n_layers=8)
    result["prefill_config"] = {k: v for k, v in prefill.items() if k != "by_length"}
    result["prefill"] = prefill["by_length"]
    result["threads"] = torch.get_num_threads()
    return result


def format_mixers(result: dict[str, Any]) -> str:
    from toolkit.bench_mixers import format_table

    lines = [format_table(result), "", "prefill, hybrid 1:7 vs Transformer (equal width and depth, B=1, no grad)"]
    cfg = result["prefill_config"]
    lines.append(f"  d_model {cfg['d_model']}, {cfg['n_layers']} layers, hybrid pattern {cfg['hybrid_pattern']}")
    lines.append(f"  {'L':>7} {'hybrid s':>10} {'transformer s':>14} {'hybrid/transformer':>19}")
    for L, row in result["prefill"].items():
        lines.append(f"  {L:>7} {row['hybrid_s']:>10.3f} {row['transformer_s']:>14.3f} {row['hybrid_over_transformer']:>19.2f}")
    return "\n".join(lines)
