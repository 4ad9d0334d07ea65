"""Run as ``python strategies_script.py CONFIG OUT.json`` (2 CPU processes; not collected by pytest).

Lightning's launcher re-runs this script for rank 1, so both ranks make the same ``train`` calls in order:

1. DDP, 6 steps; DDP with 2 accumulated micro-batches of 2 per rank (the same global batch), 6 steps;
2. FSDP2 with full (single-file) checkpoints and activation checkpointing, 6 steps;
3. FSDP2 with sharded (DCP) checkpoints, 3 steps, then ``--resume`` to 6 steps (same run name);
4. FSDP2 with ``bf16-mixed`` (bf16 compute and all-gathers, fp32 reductions and master weights), 6 steps.

Each rank uses one intra-op thread (2 processes share 2 cores). Rank 0 writes what the test compares.
"""

from __future__ import annotations

import json
import sys

import torch

torch.set_num_threads(1)

from toolkit.ranks import is_global_zero  # noqa: E402
from toolkit.train import train  # noqa: E402


def main(config: str, out: str) -> None:
    common = ["trainer.devices=2", "data.batch_size=4"]  # global batch 8 = the single-process run's
    runs = {}

    def record(key: str, result) -> None:
        stage = result.stages[0]
        runs[key] = {
            "run_id": result.run_id,
            "weights": stage.checkpoint,
            "step": stage.global_step,
            "run_dir": result.run_dir,
        }

    record("ddp", train(config, ["name=ddp", "strategy.name=ddp", *common]))
    accumulate = ["data.batch_size=2", "trainer.accumulate_grad_batches=2"]  # 2 ranks x 2 micro-batches x 2
    record(
        "ddp_accumulate", train(config, ["name=ddp_accumulate", "strategy.name=ddp", *common, *accumulate])
    )
    fsdp_full = [
        "name=fsdp_full",
        "strategy.name=fsdp",
        "strategy.checkpoint_format=full",
        "strategy.activation_checkpointing=true",
    ]
    record("fsdp_full", train(config, [*fsdp_full, *common]))
    sharded = ["name=fsdp_sharded", "strategy.name=fsdp", "strategy.checkpoint_format=sharded", *common]
    record("fsdp_sharded_first", train(config, [*sharded, "trainer.max_steps=3"]))
    record("fsdp_sharded", train(config, sharded, resume=True))
    record(
        "fsdp_bf16",
        train(config, ["name=fsdp_bf16", "strategy.name=fsdp", "trainer.precision=bf16-mixed", *common]),
    )
    if is_global_zero():
        with open(out, "w") as f:
            json.dump(runs, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
