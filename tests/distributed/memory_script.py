"""Peak memory of building a >= 1 GB decoder on meta + FSDP2 (2 processes), then eagerly for comparison.

    torchrun --nproc-per-node=2 memory_script.py OUT_DIR      # each rank writes OUT_DIR/rank{R}.json

1. ``meta``: the decoder is built on the meta device, sharded over the ranks by ``toolkit.strategies.fsdp2_sharder``
   (each layer, then the root), materialised and initialised shard by shard (``toolkit.init``), then runs one
   forward (every layer all-gathered in turn, in bf16 as under ``trainer.precision=bf16-mixed``). Reported: the
   resident memory (VmRSS) before building and the process's peak (ru_maxrss) after materialising and at the end.
2. ``eager``: once that model is freed, the same decoder built eagerly on CPU; reported: its resident growth
   (every tensor of it is resident once built, so this is a lower bound of its peak growth).

Run it with ``MALLOC_MMAP_THRESHOLD_`` fixed (the test does) so that freed gathered layers go back to the
system at once instead of staying in glibc's heap, which would count them in the resident size twice.
Not collected by pytest: ``test_memory.py`` runs it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

# wide and shallow enough to build in seconds, deep enough that one gathered layer is small beside a shard:
# 14 layers of attention + SwiGLU at d_model 2048, vocab 2048 -> 1.33 GB (1.24 GiB) of fp32 parameters
DECODER = {
    "name": "hybrid",
    "d_model": 2048,
    "n_layers": 14,
    "pattern": "transformer",
    "mixers": {"attention": {"n_heads": 16}},
    "ffns": {"mlp": {"d_ff": 1024}},
    "vocab_size": 2048,
}
MB = 2**20


def rss_now() -> int:
    """Resident bytes now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def rss_peak() -> int:
    """Peak resident bytes of this process so far (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def full_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) * 4


class LanguageModel(torch.nn.Module):
    """ids -> logits through the decoder, called as one module (FSDP2 gathers the root in its forward)."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.logits(self.decoder(self.decoder.embed(ids)))


def build(device: str | None = None, **overrides) -> LanguageModel:
    from toolkit.registry import build as build_component

    with torch.device(device) if device is not None else torch.device("cpu"):
        return LanguageModel(build_component("decoder", {**DECODER, **overrides}, "decoder"))


def run_meta(mesh, **overrides) -> tuple[LanguageModel, torch.Tensor]:
    """Build on meta, shard, materialise, one bf16 forward."""
    from toolkit.strategies import fsdp2_sharder

    model = build("meta", **overrides)
    fsdp2_sharder("bf16-mixed", seed=0)(model, mesh, torch.device("cpu"))
    ids = torch.randint(0, DECODER["vocab_size"], (1, 8))
    with torch.no_grad():
        return model, model(ids)


def main(out_dir: str) -> None:
    import gc

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from toolkit.strategies import fsdp2_sharder

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    # warm-up at a tiny size: imports, registry discovery, gloo buffers and the bf16 kernels' code pages are
    # resident before the baseline (the first bf16 forward alone pages in ~100 MB of library code)
    run_meta(mesh, d_model=64, n_layers=2, mixers={"attention": {"n_heads": 2}}, ffns={"mlp": {"d_ff": 64}})
    gc.collect()
    dist.barrier()

    # 1. meta build, shard, materialise, one forward
    before, start = rss_now(), time.time()
    model = build("meta")
    full = full_bytes(model)
    fsdp2_sharder("bf16-mixed", seed=0)(model, mesh, torch.device("cpu"))
    peak_init, init_s = rss_peak(), time.time() - start
    local = sum(p.to_local().numel() for p in model.parameters()) * 4
    ids = torch.randint(0, DECODER["vocab_size"], (1, 8))
    with torch.no_grad():
        logits = model(ids)
    result = {
        "rank": rank,
        "world": world,
        "full_bytes": full,
        "local_bytes": local,
        "rss_before": before,
        "meta_growth_init": peak_init - before,
        "meta_growth": rss_peak() - before,
        "meta_seconds_init": init_s,
        "meta_seconds": time.time() - start,
        "finite": bool(torch.isfinite(logits).all()),
    }
    del model, logits
    gc.collect()
    dist.barrier()

    # 2. the eager build of the same decoder, for comparison
    before, start = rss_now(), time.time()
    torch.manual_seed(0)
    model = build()
    result.update(
        eager_full_bytes=full_bytes(model),
        eager_rss_before=before,
        eager_growth=rss_now() - before,
        eager_seconds=time.time() - start,
    )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
