"""Training strategies from config: single device, DDP, FSDP2; precision; activation checkpointing.

Components only declare their shard units (a class attribute ``shard_unit = True`` or a ``shard_units()``
method listing sub-modules, e.g. a timm encoder's blocks); this module collects them from the built model, so
a plugin's blocks are sharded without touching this file.

``fsdp`` is FSDP2 (``torch.distributed.fsdp.fully_shard``) under Lightning's ``ModelParallelStrategy``: it runs
on CPU over gloo as well as on CUDA over NCCL (Lightning's FSDPStrategy refuses CPU), saves distributed
(sharded) checkpoints and resumes from them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from toolkit.errors import ChimeraError

STRATEGIES = ("auto", "ddp", "fsdp")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Modules to wrap on their own: declared by their class or listed by an ancestor's ``shard_units()``."""
    units: dict[int, nn.Module] = {}
    for module in model.modules():
        if getattr(type(module), "shard_unit", False):
            units[id(module)] = module
        lister = getattr(module, "shard_units", None)
        if callable(lister):
            for unit in lister():
                units[id(unit)] = unit
    return list(units.values())


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each shard unit's activations in backward; returns how many units were wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    units = {id(u) for u in shard_units(model)}
    apply_ac(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: id(m) in units)
    return len(units)


def _mixed_precision(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in ("bf16-mixed", "bf16-true", "bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision in ("16-mixed", "16-true", "16"):
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def fsdp2_sharder(precision: str, reshard_after_forward: bool = True) -> Callable[[nn.Module, Any], None]:
    """The function ``ChimeraModule.configure_model`` calls: shard every unit, then the root."""

    def shard(model: nn.Module, mesh: Any) -> None:
        from torch.distributed.fsdp import fully_shard

        policy = _mixed_precision(precision)
        dp_mesh = mesh["data_parallel"] if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        for unit in shard_units(model):
            fully_shard(unit, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)

    return shard


def make_strategy(strategy_cfg: Mapping[str, Any], trainer_cfg: Mapping[str, Any]) -> tuple[Any, Callable | None]:
    """(Lightning strategy, sharding function or None) for ``strategy.name``."""
    name = strategy_cfg.get("name", "auto")
    if name not in STRATEGIES:
        raise ChimeraError(f"strategy.name: unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}", key="strategy.name")
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
    from lightning.pytorch.strategies import ModelParallelStrategy

    sharded = strategy_cfg.get("checkpoint_format", "sharded") == "sharded"
    strategy = ModelParallelStrategy(
        data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=sharded, process_group_backend=backend
    )
    return strategy, fsdp2_sharder(str(trainer_cfg.get("precision", "32-true")), bool(strategy_cfg.get("reshard_after_forward", True)))
