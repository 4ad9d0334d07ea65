"""Which process am I: global rank 0 decides, before any Trainer (and any process group) exists."""

from __future__ import annotations

import os


def is_global_zero() -> bool:
    """Whether this process is global rank 0, from the launcher's environment.

    torchrun and SLURM set ``RANK`` / ``SLURM_PROCID``; Lightning's own launcher sets ``NODE_RANK`` and
    ``LOCAL_RANK`` for the processes it starts (its first process has neither until it launches the others).
    """
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var) is not None and (
            var != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        ):
            return int(os.environ[var]) == 0
    return (
        int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))) == 0
        and int(os.environ.get("LOCAL_RANK", "0")) == 0
    )


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
