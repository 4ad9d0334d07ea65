"""Run as ``python memory_policy_script.py CONFIG STAGED OUT.json`` under torchrun (2 CPU processes; not collected).

Both ranks make the same ``train`` calls in order:

1. FSDP2 under the memory policy: the model built on the meta device (``strategy.init=meta``) and materialised
   shard by shard, the encoder frozen, kept in bf16 and whole on every rank (``frozen_dtype=bf16``,
   ``shard_frozen=false``), activation checkpointing of the attention and Mamba layers and of the encoder
   blocks, ``reshard_after_forward=auto``: 3 steps with a sharded checkpoint, then ``resume`` to 6;
2. the two-stage recipe STAGED built on meta: stage 2 loads stage 1's weights straight into its shards.

Each rank uses one intra-op thread (2 processes share 2 cores). Rank 0 writes what the test compares.
"""

from __future__ import annotations

import json
import sys

import torch

torch.set_num_threads(1)

from toolkit.ranks import is_global_zero  # noqa: E402
from toolkit.train import train  # noqa: E402

MEMORY_POLICY = [
    "strategy.name=fsdp",
    "strategy.init=meta",
    "model.encoder.freeze=true",
    "strategy.frozen_dtype=bf16",
    "strategy.shard_frozen=false",
    "strategy.activation_checkpointing=[attention,mamba,encoder]",
    "strategy.reshard_after_forward=auto",
]


def main(config: str, staged: str, out: str) -> None:
    common = ["trainer.devices=2", "data.batch_size=4"]
    runs = {}

    def record(key: str, result) -> None:
        runs[key] = {
            "run_id": result.run_id,
            "run_dir": result.run_dir,
            "stages": [
                {"name": s.name, "weights": s.checkpoint, "step": s.global_step} for s in result.stages
            ],
        }

    meta = ["name=fsdp_meta", *MEMORY_POLICY, *common]
    record("fsdp_meta_first", train(config, [*meta, "trainer.max_steps=3"]))
    record("fsdp_meta", train(config, meta, resume=True))
    record(
        "staged_meta",
        train(staged, ["name=staged_meta", "strategy.name=fsdp", "strategy.init=meta", *common]),
    )
    if is_global_zero():
        with open(out, "w") as f:
            json.dump(runs, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
