"""Training strategies from config: single device, DDP, FSDP2; precision; memory policy; activation checkpointing.

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

Memory policy (the model at its real size; ``docs/training.md`` has the table):

- ``init: meta``: the pooler, connector and decoder are built on the meta device, sharded, then each rank
  allocates and initialises only its shards (``toolkit.init``), or loads them from the previous stage's
  weights; the encoder is built for real (it carries its own pretrained weights). ``eager`` (default)
  builds everything on CPU first.
- ``frozen_dtype`` (bf16, fp16, fp32): parts none of whose parameters train are stored in that dtype and get
  neither gradients nor optimizer state; their inputs are cast to it and their outputs back, and FSDP never
  casts them (no mixed-precision policy). ``shard_frozen: false`` keeps them whole on every rank, outside
  FSDP (no all-gathers for them).
- ``part_precision``: a mixed-precision policy per part (``{decoder: bf16-mixed}``) for that part's FSDP
  groups; the rest follows ``trainer.precision``.
- ``activation_checkpointing``: ``true`` (every shard unit), ``false``, or a list of kinds: a unit's kinds are
  its part (``encoder``, ``decoder``...) and the registry names of the mixers and FFNs inside it
  (``attention``, ``mamba``, ``mamba2``, ``mlp``, ``moe``, or a plugin's), so ``[attention, mamba, encoder]``
  checkpoints a hybrid's attention and Mamba layers and the encoder blocks.
- ``reshard_after_forward``: ``true``, ``false`` or ``auto`` (every unit reshards except the last one run,
  whose parameters backward needs first; the root keeps FSDP2's choice, no reshard).

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from toolkit.errors import ChimeraError, did_you_mean

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16")
CHECKPOINT_FORMATS = ("sharded", "full")
INIT_MODES = ("eager", "meta")
RESHARD = (True, False, "auto")
FROZEN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PART_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


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


def _unwrapped(module: nn.Module) -> nn.Module:
    return getattr(module, "_checkpoint_wrapped_module", module)


def part_of(model: nn.Module) -> dict[int, str]:
    """id(module) -> the name of the model's top-level child holding it (``encoder``, ``decoder``...)."""
    out: dict[int, str] = {}
    for name, module in model.named_modules():
        if name:
            out[id(module)] = name.split(".")[0]
    return out


def _registered_classes() -> dict[type, str]:
    """Mixer and FFN classes -> their registry names (the layer kinds a decoder layer can contain)."""
    from toolkit.registry import entries

    out: dict[type, str] = {}
    for kind in ("mixer", "ffn"):
        for entry in entries(kind):
            if isinstance(entry.target, type):
                out.setdefault(entry.target, entry.name)
    return out


def unit_kinds(model: nn.Module) -> dict[int, set[str]]:
    """id(unit) -> its kinds: the part holding it plus the registry names of the mixers/FFNs inside it.

    A LongLLaVA layer "Mamba + MoE" is ``{decoder, mamba, moe}``; a ViT block ``{encoder}``.
    """
    classes = _registered_classes()
    parts = part_of(model)
    out: dict[int, set[str]] = {}
    for unit in shard_units(model):
        kinds = {parts[id(unit)]} if id(unit) in parts else set()
        for m in _unwrapped(unit).modules():
            name = classes.get(type(m))
            if name is not None:
                kinds.add(name)
        out[id(unit)] = kinds
    return out


def known_kinds() -> list[str]:
    """Names ``strategy.activation_checkpointing`` accepts: the parts and every registered mixer and FFN."""
    from toolkit.model import PARTS
    from toolkit.registry import names

    return sorted({*PARTS, *names("mixer"), *names("ffn")})


def checkpoint_kinds(value: Any, where: str = "strategy.activation_checkpointing") -> set[str] | None:
    """``true`` -> None (every unit), ``false``/null -> empty set, a list of kinds -> that set (checked)."""
    if value is True:
        return None
    if value is False or value is None:
        return set()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(k, str) for k in items):
        raise ChimeraError(
            f"{where}: expected true, false or a list of layer kinds, got {value!r}", key=where
        )
    known = known_kinds()
    for kind in items:
        if kind not in known:
            raise ChimeraError(
                f"{where}: unknown layer kind '{kind}'{did_you_mean(kind, known)}; kinds: {', '.join(known)}",
                key=where,
            )
    return set(items)


def apply_activation_checkpointing(model: nn.Module, kinds: Any = True) -> int:
    """Recompute the selected shard units' activations in backward; returns how many units were wrapped.

    ``kinds``: ``True`` for every unit, or layer kinds (``{"attention", "mamba", "encoder"}``, see
    ``unit_kinds``): a unit is wrapped when one of its kinds is listed. Apply it before sharding
    (``fsdp2_sharder`` then shards the wrappers). Parameter names gain a ``_checkpoint_wrapped_module.``
    segment; state dicts do not (the wrapper strips it).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wanted = checkpoint_kinds(kinds)
    if wanted is None:
        units = {id(u) for u in shard_units(model)}
    else:
        units = {uid for uid, have in unit_kinds(model).items() if have & wanted}
    if units:
        apply_ac(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: id(m) in units)
    return len(units)


# --------------------------------------------------------------------------------------------- frozen parts
def frozen_parts(model: nn.Module) -> list[str]:
    """Top-level parts with parameters, none of which trains."""
    return [
        name
        for name, part in model.named_children()
        if any(True for _ in part.parameters()) and not any(p.requires_grad for p in part.parameters())
    ]


def keep_frozen(model: nn.Module, dtype: str | None) -> list[str]:
    """Store every frozen part (``frozen_parts``) in ``dtype`` (bf16, fp16, fp32; None: leave them); returns
    their names. Floating inputs are cast to ``dtype`` on the way in and outputs back to the dtype of the
    first floating input on the way out, so the parts around them are unchanged. Call it once the trainable
    set is final (after ``ChimeraModule`` applied ``optim.trainable``); FSDP then gives these parts no
    mixed-precision policy, and ``shard_frozen: false`` leaves them out of FSDP altogether.
    """
    if dtype is None:
        return []
    if dtype not in FROZEN_DTYPES:
        raise ChimeraError(
            f"strategy.frozen_dtype: '{dtype}' is not one of {', '.join(FROZEN_DTYPES)} (or null)",
            key="strategy.frozen_dtype",
        )
    target = FROZEN_DTYPES[dtype]
    names = frozen_parts(model)
    for name in names:
        part = getattr(model, name)
        part.to(target)
        if getattr(part, "_chimera_frozen_dtype", None) is None:
            _cast_around(part)
        part._chimera_frozen_dtype = target
    return names


def _cast_around(part: nn.Module) -> None:
    """Hooks: floating inputs -> the part's frozen dtype; floating outputs -> the first input's dtype."""
    seen: list[torch.dtype | None] = [None]

    def cast(value: Any, dtype: torch.dtype) -> Any:
        if torch.is_tensor(value) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(cast(v, dtype) for v in value)
        if isinstance(value, dict):
            return {k: cast(v, dtype) for k, v in value.items()}
        return value

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        first = next((a for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
        seen[0] = first.dtype if first is not None else None
        dtype = module._chimera_frozen_dtype
        return cast(args, dtype), cast(kwargs, dtype)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output if seen[0] is None else cast(output, seen[0])

    part.register_forward_pre_hook(before, with_kwargs=True)
    part.register_forward_hook(after, with_kwargs=True)


# --------------------------------------------------------------------------------------------- FSDP2
def mixed_precision_policy(precision: str, output_dtype: torch.dtype | None = None):
    """FSDP2 policy for ``trainer.precision``: bf16/fp16 compute and all-gathers, fp32 gradient reduction.

    The fp32 master weights and optimizer state stay sharded in fp32 (``*-mixed``); ``*-true`` precisions
    convert the module itself (Lightning does that), so the policy then only fixes the reduction dtype.
    ``output_dtype`` casts a group's outputs (a part whose precision differs from the root's hands back the
    root's dtype).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision.startswith("bf16"):
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=output_dtype
        )
    if precision.startswith("16"):
        return MixedPrecisionPolicy(
            param_dtype=torch.float16, reduce_dtype=torch.float32, output_dtype=output_dtype
        )
    return MixedPrecisionPolicy(output_dtype=output_dtype)


def _part_policy(precision: str, part: str | None, part_precision: Mapping[str, str], root: Any):
    """The policy of a group in ``part``: its ``part_precision`` entry, else the root's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    chosen = part_precision.get(part) if part is not None else None
    if chosen is None or chosen == precision:
        return root
    root_dtype = root.param_dtype or torch.float32
    param_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(chosen, torch.float32)
    return MixedPrecisionPolicy(
        param_dtype=param_dtype,
        reduce_dtype=torch.float32,
        output_dtype=None if param_dtype == root_dtype else root_dtype,
    )


def _mesh_device(mesh: Any) -> torch.device:
    kind = getattr(mesh, "device_type", "cpu") if mesh is not None else "cpu"
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def fsdp2_sharder(
    precision: str,
    reshard_after_forward: bool | str = True,
    *,
    part_precision: Mapping[str, str] | None = None,
    shard_frozen: bool = True,
    seed: int = 0,
    init_from: str | None = None,
) -> Callable[..., None]:
    """The function ``ChimeraModule.configure_model`` calls: shard every unit (innermost first), then the root;
    then, when the model was built on the meta device, materialise and initialise each rank's shards on the
    training device (``toolkit.init.materialize``, seeded with ``seed``) and load ``init_from`` into them.

    ``reshard_after_forward``: ``True``/``False`` for every group, or ``"auto"`` (all units but the last one
    run; the root left to FSDP2, which keeps it gathered). ``part_precision``: a policy per part for that
    part's units (and for a part without units, the part as one group). ``shard_frozen=False``: parts none of
    whose parameters train stay whole on every rank, outside FSDP. A part kept in a frozen dtype
    (``keep_frozen``) gets no mixed-precision policy.
    """
    part_precision = dict(part_precision or {})

    def shard(model: nn.Module, mesh: Any, device: torch.device | None = None) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        root_policy = mixed_precision_policy(precision)
        names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
        dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        parts = dict(model.named_children())
        outside = set() if shard_frozen else set(frozen_parts(model))
        kept = {n for n, p in parts.items() if getattr(p, "_chimera_frozen_dtype", None) is not None}
        where = part_of(model)
        units = [u for u in shard_units(model) if where.get(id(u)) not in outside]
        order = {id(m): i for i, m in enumerate(model.modules())}
        last = max(units, key=lambda u: order[id(u)]) if units else None

        def policy(part: str | None):
            if part in kept:
                return MixedPrecisionPolicy()  # stored in its frozen dtype; the hooks cast around it
            return _part_policy(precision, part, part_precision, root_policy)

        for unit in units:
            reshard = (unit is not last) if reshard_after_forward == "auto" else bool(reshard_after_forward)
            fully_shard(
                unit, mesh=dp_mesh, mp_policy=policy(where.get(id(unit))), reshard_after_forward=reshard
            )
        with_units = {where.get(id(u)) for u in units}
        for name, part in parts.items():  # a part with its own policy but no units: one group of its own
            if name in outside or name in with_units or not any(True for _ in part.parameters()):
                continue
            if name in kept or (name in part_precision and part_precision[name] != precision):
                reshard = None if reshard_after_forward == "auto" else bool(reshard_after_forward)
                fully_shard(part, mesh=dp_mesh, mp_policy=policy(name), reshard_after_forward=reshard)
        ignored = {p for name in outside for p in parts[name].parameters()}
        fully_shard(
            model,
            mesh=dp_mesh,
            mp_policy=root_policy,
            reshard_after_forward=None if reshard_after_forward == "auto" else bool(reshard_after_forward),
            ignored_params=ignored or None,
        )
        from toolkit.init import has_meta, load_sharded, materialize

        if has_meta(model):
            materialize(model, device if device is not None else _mesh_device(dp_mesh), seed=seed)
            if init_from is not None:
                load_sharded(model, init_from)

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
def check_memory_policy(strategy_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The memory-policy keys of ``strategy:``, checked (a ChimeraError names the key): ``init``,
    ``activation_checkpointing``, ``reshard_after_forward``, ``frozen_dtype``, ``shard_frozen``,
    ``part_precision``. Returns them with their defaults filled in."""
    from toolkit.model import PARTS

    init = strategy_cfg.get("init", "eager")
    if init not in INIT_MODES:
        raise ChimeraError(
            f"strategy.init: '{init}' is not one of {', '.join(INIT_MODES)}", key="strategy.init"
        )
    checkpointing = strategy_cfg.get("activation_checkpointing", False)
    if not isinstance(checkpointing, (bool, str)) and checkpointing is not None:
        checkpointing = list(checkpointing)  # an OmegaConf ListConfig
    checkpoint_kinds(checkpointing)
    reshard = strategy_cfg.get("reshard_after_forward", True)
    if reshard not in RESHARD or isinstance(reshard, int) and not isinstance(reshard, bool):
        raise ChimeraError(
            f"strategy.reshard_after_forward: expected true, false or auto, got {reshard!r}",
            key="strategy.reshard_after_forward",
        )
    frozen_dtype = strategy_cfg.get("frozen_dtype")
    if frozen_dtype is not None and frozen_dtype not in FROZEN_DTYPES:
        raise ChimeraError(
            f"strategy.frozen_dtype: '{frozen_dtype}' is not one of {', '.join(FROZEN_DTYPES)} (or null)",
            key="strategy.frozen_dtype",
        )
    shard_frozen = strategy_cfg.get("shard_frozen", True)
    if not isinstance(shard_frozen, bool):
        raise ChimeraError(
            f"strategy.shard_frozen: expected true or false, got {shard_frozen!r}",
            key="strategy.shard_frozen",
        )
    part_precision = dict(strategy_cfg.get("part_precision") or {})
    for part, value in part_precision.items():
        if part not in PARTS:
            raise ChimeraError(
                f"strategy.part_precision.{part}: not a part{did_you_mean(str(part), PARTS)}; parts: "
                f"{', '.join(PARTS)}",
                key="strategy.part_precision",
            )
        if value not in PART_PRECISIONS:
            raise ChimeraError(
                f"strategy.part_precision.{part}: '{value}' is not one of {', '.join(PART_PRECISIONS)}",
                key="strategy.part_precision",
            )
    return {
        "init": init,
        "activation_checkpointing": checkpointing,
        "reshard_after_forward": reshard,
        "frozen_dtype": frozen_dtype,
        "shard_frozen": shard_frozen,
        "part_precision": part_precision,
    }


def make_strategy(
    strategy_cfg: Mapping[str, Any],
    trainer_cfg: Mapping[str, Any],
    *,
    seed: int = 0,
    init_from: str | None = None,
) -> tuple[Any, Callable | None]:
    """(Lightning strategy, sharding function or None) for ``strategy.name``.

    ``seed`` and ``init_from`` serve ``strategy.init: meta`` under FSDP: the sharder initialises each rank's
    shards with ``seed``, then loads ``init_from`` (the previous stage's weights) into them.
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
    policy = check_memory_policy(strategy_cfg)
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
    return strategy, fsdp2_sharder(
        precision,
        policy["reshard_after_forward"],
        part_precision=policy["part_precision"],
        shard_frozen=policy["shard_frozen"],
        seed=seed,
        init_from=init_from if policy["init"] == "meta" else None,
    )
