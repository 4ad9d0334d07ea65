"""Materialising a model built on the meta device: allocate its tensors, initialise them, or load them.

``strategy.init: meta`` follows torchtitan's recipe (``docs/fsdp.md`` there): build the parts on ``meta`` (no
memory), ``fully_shard`` them, then ``materialize`` on the training device, so every rank allocates and
initialises only its own shards; or load a checkpoint straight into the shards (``load_sharded``)::

    with torch.device("meta"): model = build(...)     # shapes only
    fully_shard(unit) ...; fully_shard(model)         # DTensor shards, still on meta
    materialize(model, device, seed=cfg.seed)         # to_empty + every module's own initialisation
    load_sharded(model, "final.safetensors")          # optional: each rank reads its rows only

Initialisation protocol (what a component provides so it can be built on meta):

- A module re-creates its own parameters and buffers in ``reset_parameters()`` (every torch module with
  parameters has one: Linear, Conv1d, Embedding, LayerNorm, RMSNorm...) or, timm/torchtitan style, in
  ``init_weights()`` (taken in preference when a module has both).
- ``init_weights`` walks the tree children first, then the parent (post-order), as constructors run: a part
  whose initialisation differs from its children's defaults (the decoder's N(0, 0.02) embedding, Mamba's
  dt/A/D) says so in its own method, and it wins. Children may be initialised twice; only the last draw counts.
- Only subtrees built on meta are initialised: parts built for real (the encoder, which carries its own
  pretrained weights) are left as they are.
- Checked: ``materialize`` fills every new floating tensor with NaN first and raises, naming the tensors,
  when an initialisation left any of them untouched (a module without ``reset_parameters``). Integer buffers
  cannot be checked this way.

Random numbers. Deterministic initialisations (norm weights 1, zero biases, Mamba's A_log = log(1..N) and
D = 1, buffers) give exactly the eager build's tensors. Random ones follow the same distributions (bounds
come from the global shapes: a DTensor reports its full size) but not the same numbers: the eager build
draws them in constructor order from one CPU stream. On CPU, DTensor has no sharded random generator, so
each rank draws its shards from its own stream (``seed`` mixed with the rank); the same seed on every rank
would give every shard the same rows. On CUDA, DTensor's offset-based generator draws each shard as the
matching slice of one full-size draw, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from toolkit.errors import ChimeraError

__all__ = ["has_meta", "init_weights", "load_sharded", "materialize"]

_RANK_STRIDE = 1_000_003  # per-rank CPU seed: seed + rank * stride


def _local(t: Tensor) -> Tensor:
    """The tensor a rank holds: a DTensor's local shard, else the tensor itself."""
    return getattr(t, "_local_tensor", t)


def _tensors(module: nn.Module, recurse: bool = True) -> Iterator[Tensor]:
    yield from module.parameters(recurse=recurse)
    yield from module.buffers(recurse=recurse)


def has_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is still on the meta device."""
    return any(t.is_meta for t in _tensors(module))


def _meta_subtrees(module: nn.Module) -> set[int]:
    """ids of the modules whose every parameter and buffer (own and descendants') is on meta."""
    out: set[int] = set()
    for m in module.modules():
        tensors = list(_tensors(m))
        if tensors and all(t.is_meta for t in tensors):
            out.add(id(m))
    return out


def _own_init(module: nn.Module):
    """The module's own initialisation: ``init_weights()`` if it has one callable without arguments, else
    ``reset_parameters()``; None when it has neither."""
    for name in ("init_weights", "reset_parameters"):
        fn = getattr(module, name, None)
        if callable(fn):
            try:
                required = [
                    p
                    for p in inspect.signature(fn).parameters.values()
                    if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                ]
            except (TypeError, ValueError):
                required = []
            if not required:
                return fn
    return None


def init_weights(module: nn.Module, only: set[int] | None = None) -> None:
    """Run every module's own initialisation, children before parents (see the module docstring).

    ``only``: ids of the modules to initialise (default: all). Works on plain tensors and on FSDP2's DTensor
    shards alike (a plain tensor an initialisation builds, e.g. Mamba's ``A_log`` table, is taken as
    replicated and each rank keeps its slice).
    """

    def visit(m: nn.Module) -> None:
        for child in m.children():
            visit(child)
        if only is not None and id(m) not in only:
            return
        fn = _own_init(m)
        if fn is not None:
            fn()

    with torch.no_grad(), _dtensor_init_context(module):
        visit(module)


@contextlib.contextmanager
def _dtensor_init_context(module: nn.Module) -> Iterator[None]:
    """Let initialisations that mix DTensor shards with plain tensors run (``implicit_replication``), and
    silence DTensor's "random ops on CPU" warning (handled by per-rank seeds, see ``materialize``)."""
    if not any(_is_dtensor(t) for t in _tensors(module)):
        yield
        return
    from torch.distributed.tensor.experimental import implicit_replication

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        with implicit_replication():
            yield


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "_local_tensor") and hasattr(t, "placements")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _seed_for(module: nn.Module, device: torch.device, seed: int) -> int:
    """The seed this rank initialises with: ``seed`` itself, unless the shards are on CPU (no DTensor
    sharded generator), where each rank needs its own stream."""
    sharded = any(_is_dtensor(t) for t in _tensors(module))
    if sharded and device.type == "cpu":
        return (int(seed) + _rank() * _RANK_STRIDE) % (2**63)
    return int(seed)


def materialize(
    module: nn.Module, device: torch.device | str, *, seed: int = 0, check: bool = True
) -> list[str]:
    """Allocate every meta tensor of ``module`` on ``device`` and initialise it; returns the names allocated.

    Tensors already materialised (an encoder built for real) keep their values. The global RNG state is
    left as it was (the initialisation draws from a forked generator seeded with ``seed``).
    """
    device = torch.device(device)
    names = [n for n, t in _named_tensors(module) if t.is_meta]
    if not names:
        return []
    subtrees = _meta_subtrees(module)
    # a module with meta tensors of its own inside a partly materialised subtree cannot run its init
    # without touching the real tensors beside them
    mixed = [
        n or type(module).__name__
        for n, m in module.named_modules()
        if id(m) not in subtrees and any(t.is_meta for t in _tensors(m, recurse=False))
    ]
    if mixed:
        raise ChimeraError(
            f"cannot initialise {', '.join(mixed[:5])} after a meta-device build: it holds meta tensors beside "
            "materialised ones; build the whole part on meta or for real"
        )
    # to_empty on the root (FSDP2 re-registers its shards in its _apply), materialised tensors kept as they are
    module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    new = {n for n in names}
    tensors = dict(_named_tensors(module))
    if check:
        with torch.no_grad():
            for n in new:
                local = _local(tensors[n])
                if local.is_floating_point():
                    local.fill_(float("nan"))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(_seed_for(module, device, seed))
        init_weights(module, only=subtrees)
    if check:
        left = [n for n in sorted(new) if _has_nan(_local(tensors[n]))]
        if left:
            raise ChimeraError(
                f"after a meta-device build, {len(left)} tensors were not initialised (e.g. {', '.join(left[:5])}): "
                "their module has no reset_parameters() / init_weights(); add one (see toolkit/init.py)"
            )
    return sorted(new)


def _has_nan(t: Tensor) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return False
    return bool(torch.isnan(t).any())


def _named_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters and buffers by name (shared tensors once, under their first name)."""
    out, seen = [], set()
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


# --------------------------------------------------------------------------------------------- loading
def load_sharded(model: nn.Module, path: str | Path) -> None:
    """Load full weights (``final.safetensors`` or any checkpoint ``read_state_dict`` reads) into a model
    whose parameters may be FSDP2 shards. Strict: every key of the model, nothing else.

    A local safetensors file is read slice by slice: each rank reads only the rows of its own shards (memory
    of one shard). Any other checkpoint is read whole by rank 0 and broadcast tensor by tensor into the
    shards (``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``). Tensors are cast to
    the model's dtypes (a bf16 frozen encoder takes fp32 weights).
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem) and fs.isfile(root):
        from toolkit.checkpointing import _is_safetensors, _magic

        if _is_safetensors(_magic(fs, root)):
            _load_safetensors_slices(model, root, str(path))
            return
    _load_broadcast(model, path)


def _model_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's persistent tensors by state-dict name (no activation-checkpoint or FSDP segments)."""
    return model.state_dict(keep_vars=True)


def _check_keys(model_keys: set[str], file_keys: set[str], path: str) -> None:
    missing, unexpected = sorted(model_keys - file_keys), sorted(file_keys - model_keys)
    if missing or unexpected:
        raise ChimeraError(
            f"{path}: checkpoint does not match the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def _load_safetensors_slices(model: nn.Module, root: str, path: str) -> None:
    from safetensors import safe_open

    state = _model_state(model)
    with safe_open(root, framework="pt") as f:
        _check_keys(set(state), set(f.keys()), path)
        done: set[int] = set()
        with torch.no_grad():
            for name, target in state.items():
                if id(target) in done:  # tied weights: written once
                    continue
                done.add(id(target))
                local = _local(target)
                if local.is_meta:
                    raise ChimeraError(f"{path}: cannot load {name}: the model still holds it on meta")
                if _is_dtensor(target):
                    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                    shape, offset = compute_local_shape_and_global_offset(
                        target.shape, target.device_mesh, target.placements
                    )
                    if local.numel() == 0:
                        continue
                    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
                    piece = f.get_slice(name)[index]
                else:
                    piece = f.get_tensor(name)
                if tuple(piece.shape) != tuple(local.shape):
                    raise ChimeraError(
                        f"{path}: {name} has shape {tuple(piece.shape)} where the model's "
                        f"{'shard ' if _is_dtensor(target) else ''}is {tuple(local.shape)}"
                    )
                local.copy_(piece)


def _load_broadcast(model: nn.Module, path: str | Path) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from toolkit.checkpointing import read_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        full = read_state_dict(path)
        _check_keys(set(_model_state(model)), set(full), str(path))
        model.load_state_dict(full, strict=True)
        return
    full = read_state_dict(path) if dist.get_rank() == 0 else {}
    ok = [True]
    if dist.get_rank() == 0:
        try:
            _check_keys(set(_model_state(model)), set(full), str(path))
        except ChimeraError as exc:
            ok = [str(exc)]
    dist.broadcast_object_list(ok, src=0)
    if ok[0] is not True:
        raise ChimeraError(str(ok[0]))
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )
