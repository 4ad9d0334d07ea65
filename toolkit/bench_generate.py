"""``chimera bench generate``: long-context inference of a 1:7 hybrid against a Transformer of equal width and
depth, LongLLaVA's efficiency table in miniature (arXiv 2409.02889, 100K-token prompt on one GPU: prefill
16.5 s vs 34.0 s, decode 62 vs 15 tokens/s, memory 38.7 vs 79.4 GB).

For each context length L, both decoders (``toolkit.bench._decoder``: same width, depth, FFNs and vocabulary;
``hybrid_1_7`` puts one attention layer among seven Mamba-1 layers) run what generation runs
(``toolkit.generate.decode_steps``): a prefill of L random tokens into a cache sized for L + ``new_tokens``,
then ``new_tokens`` greedy steps. Both run side by side so a busy spell slows both alike: the prefills
alternate (who goes first too) and a prefill figure is the best of ``repeats`` (a shared machine only ever adds
time); then the two models' decoding steps alternate one by one, and the decoding speedup is the median of the
step-pair ratios (tokens/s beside it: one over the median step). Keys, per L::

    generate[L].prefill_ratio   hybrid prefill seconds / Transformer's      (< 1: the hybrid is faster)
    generate[L].decode_speedup  Transformer's decoding step / the hybrid's  (> 1: the hybrid is faster)
    generate[L].memory_ratio    hybrid cache bytes / Transformer's          (KV cache vs KV + Mamba states)

with the raw seconds, tokens/s and bytes beside them, and ``peak_*_bytes``: the most tensor memory alive at once
during a prefill and two decoding steps (the cache and the prompt embeddings included, the weights not): on
CUDA the allocator's peak, elsewhere every tensor storage an operation allocates, counted until it is freed
(``TensorPeak``; workspace a kernel allocates internally is not seen).
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from toolkit.generate import decode_steps

LENGTHS = (4096, 16384)
QUICK_LENGTHS = (256, 1024)
MODELS = (("hybrid", "hybrid_1_7"), ("transformer", "transformer"))


class TensorPeak(TorchDispatchMode):
    """Counts the bytes of every tensor storage an operation allocates while active, until it is freed;
    ``peak`` is the most alive at once. Storages that existed before (weights, inputs) are not counted: an
    output sharing an input's storage (a view, an in-place or ``out=`` operation) allocates nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if key in inputs or key in self._live or nbytes == 0:
                continue
            self._live.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """The most tensor memory ``fn`` holds at once beyond what existed before it ran (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    tracker = TensorPeak()
    with tracker:
        fn()
    return int(tracker.peak)


def cache_bytes(cache: Sequence[Any]) -> int:
    """Bytes of the decoding state: every tensor of every layer's state (``pad`` aside)."""
    total = 0
    for state in cache:
        if state is None:
            continue
        for name, value in vars(state).items():
            if isinstance(value, Tensor) and name != "pad":
                total += value.numel() * value.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(decoder: nn.Module, ids: Tensor, new_tokens: int) -> tuple[float, Iterator[Any], list[Any]]:
    """Start a generation: (prefill seconds, the generator of the remaining steps, the cache)."""
    device = ids.device
    cache = decoder.allocate_cache(1, ids.shape[1] + new_tokens, device=device)
    embeds = decoder.embed(ids)
    _sync(device)
    t0 = time.perf_counter()
    steps = decode_steps(decoder, embeds, max_new_tokens=new_tokens, cache=cache)
    next(steps)  # the prefill and the first token
    _sync(device)
    return time.perf_counter() - t0, steps, cache


def _step(steps: Iterator[Any], device: torch.device) -> float:
    t0 = time.perf_counter()
    next(steps)
    _sync(device)
    return time.perf_counter() - t0


def bench_generate(
    lengths: Sequence[int] = LENGTHS,
    d_model: int = 128,
    n_layers: int = 8,
    new_tokens: int = 64,
    repeats: int | None = None,
    device: str | None = None,
    peak: bool = True,
) -> dict[str, Any]:
    """Everything ``chimera bench generate`` reports (stable keys: see the module docstring)."""
    from components import cpu_kernels
    from toolkit.bench import _decoder

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    decoders = {name: _decoder(pattern, d_model, n_layers, str(device)) for name, pattern in MODELS}
    out: dict[str, Any] = {
        "config": {
            "d_model": d_model,
            "n_layers": n_layers,
            "new_tokens": new_tokens,
            "patterns": {name: decoders[name].pattern for name, _ in MODELS},
            "batch": 1,
            "cpu_kernels": "numba" if device.type == "cpu" and cpu_kernels.kernels() else "pytorch",
        },
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "generate": {},
    }
    with torch.inference_mode():
        for L in lengths:
            ids = torch.randint(0, decoders["hybrid"].vocab_size, (1, int(L)), device=device)
            reps = repeats or (3 if L <= 4096 else 2)
            prefill = {name: float("inf") for name in decoders}
            steps: dict[str, list[float]] = {name: [] for name in decoders}
            caches: dict[str, int] = {}
            for dec in decoders.values():  # warm-up (first-call allocations)
                for _ in _prefill(dec, ids[:, :64], 2)[1]:
                    pass
            for r in range(reps):
                order = list(decoders) if r % 2 == 0 else list(reversed(decoders))  # alternate who goes first
                running = {}
                for name in order:
                    seconds, running[name], cache = _prefill(decoders[name], ids, new_tokens)
                    prefill[name] = min(prefill[name], seconds)
                    caches[name] = cache_bytes(cache)
                for _ in range(new_tokens - 1):  # decoding steps alternate between the models, one by one
                    for name in order:
                        steps[name].append(_step(running[name], device))
                del running, cache
            pairs = [t / h for h, t in zip(steps["hybrid"], steps["transformer"])]
            row: dict[str, Any] = {
                "prefill_ratio": prefill["hybrid"] / prefill["transformer"],
                "decode_speedup": statistics.median(pairs),
                "memory_ratio": caches["hybrid"] / caches["transformer"],
            }
            for name in decoders:
                row[f"{name}_prefill_s"] = prefill[name]
                row[f"{name}_decode_tok_s"] = 1.0 / statistics.median(steps[name])
                row[f"{name}_cache_bytes"] = caches[name]
            if peak:
                for name, dec in decoders.items():

                    def once(dec: nn.Module = dec, ids: Tensor = ids) -> None:
                        for _ in _prefill(dec, ids, 3)[1]:
                            pass

                    row[f"{name}_peak_bytes"] = peak_bytes(once, device)
                row["peak_ratio"] = row["hybrid_peak_bytes"] / row["transformer_peak_bytes"]
            row["repeats"] = reps
            out["generate"][str(L)] = row
    return out


def format_generate(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "generation, hybrid 1:7 vs Transformer (equal width and depth, B=1, prefill then greedy decoding)",
        f"  d_model {cfg['d_model']}, {cfg['n_layers']} layers, hybrid {cfg['patterns']['hybrid']}, "
        f"{cfg['new_tokens']} new tokens; {result['device']}, {result['threads']} threads, "
        f"{cfg.get('cpu_kernels', 'pytorch')} CPU steps; side by side",
        f"  {'L':>7} {'prefill s (h / t)':>19} {'ratio':>6} {'decode tok/s (h / t)':>22} {'speedup':>8} "
        f"{'cache MB (h / t)':>18} {'ratio':>6} {'peak MB (h / t)':>18}",
    ]
    mb = 1024**2
    for L, r in result["generate"].items():
        peak = (
            f"{r['hybrid_peak_bytes'] / mb:8.1f} / {r['transformer_peak_bytes'] / mb:<7.1f}"
            if "hybrid_peak_bytes" in r
            else f"{'-':>18}"
        )
        lines.append(
            f"  {L:>7} {r['hybrid_prefill_s']:8.3f} / {r['transformer_prefill_s']:<8.3f} {r['prefill_ratio']:6.2f} "
            f"{r['hybrid_decode_tok_s']:9.1f} / {r['transformer_decode_tok_s']:<10.1f} {r['decode_speedup']:8.2f} "
            f"{r['hybrid_cache_bytes'] / mb:8.2f} / {r['transformer_cache_bytes'] / mb:<7.2f} "
            f"{r['memory_ratio']:6.3f} {peak}"
        )
    return "\n".join(lines)


def generate_bench_command(
    as_json: bool = False,
    quick: bool = False,
    command: str = "",
    lengths: Sequence[int] | None = None,
    new_tokens: int | None = None,
    d_model: int = 128,
    n_layers: int = 8,
) -> int:
    """``chimera bench generate [--json] [--quick] [--lengths L ...]``: print the table (or the JSON) and the
    exact command that measured it."""
    import json

    from toolkit.errors import ChimeraError

    lengths = list(lengths or (QUICK_LENGTHS if quick else LENGTHS))
    new_tokens = new_tokens or (8 if quick else 64)
    if min(lengths) < 1 or new_tokens < 2:
        raise ChimeraError(
            f"bench generate: need lengths >= 1 and --new-tokens >= 2, got {lengths}, {new_tokens}"
        )
    result = bench_generate(lengths=lengths, d_model=d_model, n_layers=n_layers, new_tokens=new_tokens)
    result["command"] = command or "chimera bench generate" + (" --quick" if quick else "")
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(format_generate(result))
        print(f"\n(measured by: {result['command']})")
    return 0
