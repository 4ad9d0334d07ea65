"""Training strategies from config: single device, DDP, FSDP2; precision; activation checkpointing.

One ``strategy:`` section (shared through ``experiments/strategies/{single,ddp,fsdp}.yaml``) picks how an
experiment is distributed; nothing else in the experiment changes::

    strategy: {name: fsdp, activation_checkpointing: true, checkpoint_format: sharded}
    trainer:  {devices: 8, num_nodes: 2, precision: bf16-mixed}

- ``auto``: one process on whatever accelerator Lightning finds.
- ``ddp``: Lightning's ``DDPStrategy`` (NCCL on CUDA, gloo on CPU).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) under Lightning's ``ModelParallelStrategy``:
  ``ChimeraModule.configure_model`` shards every shard unit, then the root, over all ranks (no tensor
  parallelism), with a ``MixedPrecisionPolicy`` from ``trainer.precision``. It runs on CPU over gloo as well
  as on CUDA over NCCL (Lightning's FSDPStrategy refuses CPU). Checkpoints are ``sharded`` (a
  torch.distributed.checkpoint directory: each rank writes its shards) or ``full`` (rank 0 gathers one file).

Components only declare their shard units (a class attribute ``shard_unit = True`` or a ``shard_units()``
method listing sub-modules, e.g. a timm encoder's blocks); this module collects them from the built model, so
a plugin's blocks are sharded (and activation-checkpointed) without touching this file.

Checkpoint writes are atomic for every strategy: single files go through ``AtomicCheckpointIO`` (write a
temporary file next to the target, then rename), sharded directories are written under a hidden
``.NAME.partial`` name and renamed into place once every rank has finished (``FSDP2Strategy``). A reader
(``toolkit.checkpointing.latest_checkpoint``) therefore never sees a half-written checkpoint under its
final name, even after ``kill -9``.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from toolkit.errors import ChimeraError

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16")
CHECKPOINT_FORMATS = ("sharded", "full")


# --------------------------------------------------------------------------------------------- shard units
def shard_units(model: nn.Module) -> list[nn.Module]:
    """Modules to wrap on their own, innermost first.

    A module is a unit when its class says so (``shard_unit = True``) or an ancestor's ``shard_units()`` lists
    it. A unit wrapped by activation checkpointing is represented by its wrapper (FSDP2 must shard the module
    that is called). Descendants come before their ancestors, as ``fully_shard`` requires.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    units: dict[int, nn.Module] = {}
    for module in model.modules():
        if getattr(type(module), "shard_unit", False):
            units[id(module)] = module
        lister = getattr(module, "shard_units", None)
        if callable(lister):
            for unit in lister():
                units[id(unit)] = unit
    for module in model.modules():  # a wrapper stands for the unit it wraps
        if isinstance(module, CheckpointWrapper):
            inner = module._checkpoint_wrapped_module
            if id(inner) in units or id(module) in units:
                units.pop(id(inner), None)
                units[id(module)] = module
    order = {id(m): i for i, m in enumerate(model.modules())}  # pre-order: ancestors before descendants
    return sorted(units.values(), key=lambda m: -order.get(id(m), -1))


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each shard unit's activations in backward; returns how many units were wrapped.

    Apply it before sharding (``fsdp2_sharder`` then shards the wrappers). Parameter names gain a
    ``_checkpoint_wrapped_module.`` segment; state dicts do not (the wrapper strips it).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    units = {id(u) for u in shard_units(model)}
    apply_ac(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: id(m) in units)
    return len(units)


# --------------------------------------------------------------------------------------------- FSDP2
def mixed_precision_policy(precision: str):
    """FSDP2 policy for ``trainer.precision``: bf16/fp16 compute and all-gathers, fp32 gradient reduction.

    The fp32 master weights and optimizer state stay sharded in fp32 (``*-mixed``); ``*-true`` precisions
    convert the module itself (Lightning does that), so the policy then only fixes the reduction dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision.startswith("16"):
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def fsdp2_sharder(precision: str, reshard_after_forward: bool = True) -> Callable[[nn.Module, Any], None]:
    """The function ``ChimeraModule.configure_model`` calls: shard every unit (innermost first), then the root."""

    def shard(model: nn.Module, mesh: Any) -> None:
        from torch.distributed.fsdp import fully_shard

        policy = mixed_precision_policy(precision)
        names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
        dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        for unit in shard_units(model):
            fully_shard(unit, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)

    return shard


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure FSDP2: data parallel over every rank, atomic sharded checkpoints.

    Lightning's ``data_parallel_size="auto"`` means "one per node" (it expects tensor parallelism inside a
    node); Chimera shards over all ``num_nodes * devices`` ranks instead. A sharded checkpoint is written to
    ``.NAME.partial`` and renamed to ``NAME`` by rank 0 after every rank has written its shards, so a
    directory under a ``.ckpt`` name is always complete.
    """

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)
        self.barrier("chimera_ckpt_clean")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("chimera_ckpt_written")
        if self.is_global_zero:
            replace_dir(partial, path)
        self.barrier("chimera_ckpt_renamed")


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``; an existing ``dst`` is renamed away first, then removed."""
    old = None
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- checkpoint IO
class AtomicCheckpointIO(TorchCheckpointIO):
    """Single-file checkpoints written atomically on any fsspec filesystem.

    Lightning's own ``_atomic_save`` commits an fsspec transaction, which for local paths writes a temporary
    file in the system temp directory and ``shutil.move``s it: a rename only when that directory is on the
    checkpoint's filesystem, else a copy that a kill can leave half-written. Here the temporary file sits
    next to the target (same filesystem), is fsynced, then ``os.replace``d. Object stores get one PUT, which
    is atomic by itself.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(str(path), buffer.getbuffer())


def atomic_write_bytes(path: str, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` (local or any fsspec URL) so that readers see the old or the new file only."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, target = fsspec.core.url_to_fs(path)
    parent = fs._parent(target)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(target, bytes(data))
        return
    tmp = os.path.join(
        os.path.dirname(target), f".{os.path.basename(target)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # persist the rename itself
        fd = os.open(os.path.dirname(target) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------- from config
def make_strategy(
    strategy_cfg: Mapping[str, Any], trainer_cfg: Mapping[str, Any]
) -> tuple[Any, Callable | None]:
    """(Lightning strategy, sharding function or None) for ``strategy.name``.

    Pass ``AtomicCheckpointIO()`` in the Trainer's ``plugins`` as well (``toolkit.train`` does).
    """
    name = strategy_cfg.get("name", "auto")
    if name not in STRATEGIES:
        raise ChimeraError(
            f"strategy.name: unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}",
            key="strategy.name",
        )
    precision = str(trainer_cfg.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ChimeraError(
            f"trainer.precision: '{precision}' is not supported; choose one of {', '.join(PRECISIONS)}",
            key="trainer.precision",
        )
    fmt = strategy_cfg.get("checkpoint_format", "sharded")
    if fmt not in CHECKPOINT_FORMATS:
        raise ChimeraError(
            f"strategy.checkpoint_format: '{fmt}' is not one of {', '.join(CHECKPOINT_FORMATS)}",
            key="strategy.checkpoint_format",
        )
    accelerator = trainer_cfg.get("accelerator", "auto")
    on_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    backend = "nccl" if on_cuda else "gloo"
    if name == "auto":
        return "auto", None
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            process_group_backend=backend,
            find_unused_parameters=bool(strategy_cfg.get("find_unused_parameters", False)),
        ), None
    strategy = FSDP2Strategy(save_distributed_checkpoint=fmt == "sharded", process_group_backend=backend)
    return strategy, fsdp2_sharder(precision, bool(strategy_cfg.get("reshard_after_forward", True)))
