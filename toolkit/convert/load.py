"""Lazy weight reading and meta-device materialisation.

A checkpoint is read one tensor at a time: ``SafetensorsFile`` parses a safetensors header (the 8-byte length
and the JSON table) through fsspec and reads each tensor's bytes straight into a fresh tensor with one
``readinto``, so a local path, ``s3://`` or ``gs://`` all work and nothing is memory-mapped twice.
``Checkpoint`` puts the files of a Hugging Face directory together (``model.safetensors``, sharded
``model.safetensors.index.json``, or a torch ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``).

``materialize`` puts tensors into a module built on the meta device: each parameter is replaced by a
Parameter wrapping the checkpoint tensor (as ``load_state_dict(assign=True)`` does, but keeping ``requires_grad``,
the parameter's tags such as ``_no_weight_decay``, and tied weights tied), so the peak is one copy of the
weights and nothing is randomly initialised first. A module already on a real device gets the tensors copied in.

Nothing here unpickles arbitrary objects: safetensors files hold tensors only, and torch files go through
``toolkit.checkpointing.safe_torch_load``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from toolkit.errors import ChimeraError

# safetensors dtype names -> torch dtypes
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _dtype in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _dtype):
        DTYPES[_name] = getattr(torch, _dtype)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"


def join(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}"


class SafetensorsFile:
    """One safetensors file read lazily through fsspec: ``names()``, ``shape(key)``, ``read(key)``."""

    def __init__(self, path: str) -> None:
        import fsspec

        self.path = str(path)
        self.fs, self.root = fsspec.core.url_to_fs(self.path)
        try:
            with self.fs.open(self.root, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ValueError("shorter than a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if not 1 < n < 100_000_000:
                    raise ValueError(f"implausible header length {n}")
                header = json.loads(f.read(n))
        except FileNotFoundError as exc:
            raise ChimeraError(f"{path}: file not found") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise ChimeraError(f"{path}: not a safetensors file ({exc})") from exc
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.offset = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        for key, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise ChimeraError(f"{path}: tensor '{key}' has unsupported dtype {entry.get('dtype')!r}")

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a fresh CPU tensor (its bytes read once, no other copy)."""
        entry = self.entries[key]
        start, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        raw = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            with self.fs.open(self.root, "rb") as f:
                f.seek(self.offset + start)
                view = memoryview(raw.numpy())
                got = 0
                while got < len(view):  # remote file objects may return short reads
                    n = f.readinto(view[got:])
                    if not n:
                        raise ChimeraError(f"{self.path}: truncated while reading tensor '{key}'")
                    got += n
        if dtype == torch.bool:
            return raw.view(torch.bool).reshape(shape)
        return raw.view(dtype).reshape(shape)


class _TorchFile:
    """A torch weights file (``pytorch_model.bin``, LLaVA's ``mm_projector.bin``) read safely, all at once."""

    def __init__(self, path: str) -> None:
        import fsspec

        from toolkit.checkpointing import safe_torch_load

        fs, root = fsspec.core.url_to_fs(str(path))
        if not fs.exists(root):
            raise ChimeraError(f"{path}: file not found")
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(fs, LocalFileSystem):
            state = safe_torch_load(root)
        else:
            import io

            with fs.open(root, "rb") as f:
                state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ChimeraError(f"{path}: not a weights file (holds a {type(state).__name__})")
        self.path = str(path)
        self.tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def read(self, key: str) -> torch.Tensor:
        return self.tensors.pop(key)  # handed over once: the file's copy is the model's copy


class Checkpoint:
    """The weights of a file or a Hugging Face directory, read tensor by tensor.

    ``path`` is a ``.safetensors`` file, a torch file (``.bin``/``.pt``/``.pth``/``.ckpt``), or a directory
    holding ``model.safetensors``, ``model.safetensors.index.json`` (shards), or their ``pytorch_model.bin``
    equivalents. Paths go through fsspec.
    """

    def __init__(self, path: str) -> None:
        import fsspec

        self.path = str(path)
        fs, root = fsspec.core.url_to_fs(self.path)
        if not fs.exists(root):
            raise ChimeraError(f"{path}: not found")
        files: list[str]
        if fs.isdir(root):
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
            if INDEX in names or TORCH_INDEX in names:
                index = INDEX if INDEX in names else TORCH_INDEX
                with fs.open(join(root, index), "r") as f:
                    weight_map = json.load(f).get("weight_map") or {}
                files = [join(self.path, name) for name in dict.fromkeys(weight_map.values())]
            elif SINGLE in names or TORCH_SINGLE in names:
                files = [join(self.path, SINGLE if SINGLE in names else TORCH_SINGLE)]
            else:
                found = sorted(n for n in names if n.endswith((".safetensors", ".bin")))
                if not found:
                    raise ChimeraError(
                        f"{path}: no weights found (expected {SINGLE}, {INDEX} or {TORCH_SINGLE})"
                    )
                files = [join(self.path, n) for n in found]
        else:
            files = [self.path]
        self.files = [self._open(f) for f in files]
        self._where: dict[str, Any] = {}
        for file in self.files:
            for key in file.names():
                self._where.setdefault(key, file)
        self._cache: tuple[str, torch.Tensor] | None = None

    @staticmethod
    def _open(path: str) -> SafetensorsFile | _TorchFile:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        with fs.open(root, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":
            return SafetensorsFile(path)
        if path.endswith(".safetensors"):
            raise ChimeraError(f"{path}: not a safetensors file (bad header)")
        return _TorchFile(path)

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def read(self, key: str, *, keep: bool = False) -> torch.Tensor:
        """One tensor; ``keep`` holds it for the next call (a fused tensor split into several parameters)."""
        if self._cache is not None and self._cache[0] == key:
            tensor = self._cache[1]
        else:
            tensor = self._where[key].read(key)
        self._cache = (key, tensor) if keep else None
        return tensor


# ------------------------------------------------------------------------------------------- key plans
@dataclass
class Source:
    """Where one target tensor comes from: checkpoint ``keys`` combined by ``combine`` (None: the one key as
    is). ``shape`` is the resulting shape, known from the headers before anything is read."""

    keys: tuple[str, ...]
    shape: tuple[int, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None


@dataclass
class Plan:
    """target key -> Source, plus the checkpoint keys no rule used (reported as unexpected)."""

    sources: dict[str, Source] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)


def check_plan(
    plan: Plan,
    module: nn.Module,
    where: str,
    *,
    optional: Iterable[str] = (),
    grow_rows: Iterable[str] = (),
) -> None:
    """Raise a ChimeraError naming every missing, unexpected and mis-shaped key at once.

    ``optional`` target keys may be absent (a tied head); ``grow_rows`` may have fewer rows in the checkpoint
    than in the module (embeddings grown for added tokens).
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    optional, grow_rows = set(optional), set(grow_rows)
    missing = [k for k in expected if k not in plan.sources and k not in optional]
    unexpected = list(plan.unused) + [
        f"{k} (from {src.keys[0]})" for k, src in plan.sources.items() if k not in expected
    ]
    misshaped = []
    for key, src in plan.sources.items():
        if key not in expected or src.shape == expected[key]:
            continue
        want = expected[key]
        if (
            key in grow_rows
            and len(src.shape) == len(want)
            and src.shape[1:] == want[1:]
            and src.shape[0] <= want[0]
        ):
            continue
        misshaped.append(f"{key} (checkpoint {list(src.shape)} from {src.keys[0]}, model {list(want)})")
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise ChimeraError(f"{where}: checkpoint does not match the model: " + "; ".join(problems))


def _param_groups(module: nn.Module) -> dict[str, list[str]]:
    """Each state key -> every name of the same tensor (tied weights share one Parameter)."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]:
        by_id.setdefault(id(tensor), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        if isinstance(value, nn.Parameter):
            new = value
        else:
            new = nn.Parameter(value, requires_grad=old.requires_grad)
            new.__dict__.update(getattr(old, "__dict__", {}))  # tags: _no_weight_decay, _no_reinit, ...
        owner._parameters[leaf] = new
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(name)


def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _grow_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean of the existing ones (new tokens start at the mean embedding)."""
    if tensor.shape[0] >= rows:
        return tensor
    extra = (
        tensor.float()
        .mean(dim=0, keepdim=True)
        .to(tensor.dtype)
        .expand(rows - tensor.shape[0], *tensor.shape[1:])
    )
    return torch.cat([tensor, extra])


def iter_tensors(module: nn.Module, plan: Plan, checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module key, tensor)`` for every planned tensor, read one at a time (a fused checkpoint tensor once);
    rows missing from a grown embedding/head are added as the mean of the checkpoint's rows. Tied names are
    yielded once, under their first name. For loaders that place tensors themselves (sharded loading)."""
    groups = _param_groups(module)
    done: set[str] = set()
    order = sorted(plan.sources, key=lambda k: plan.sources[k].keys)
    for i, key in enumerate(order):
        if key in done or key not in groups:
            continue
        src = plan.sources[key]
        keep = i + 1 < len(order) and plan.sources[order[i + 1]].keys == src.keys
        tensors = [checkpoint.read(k, keep=keep) for k in src.keys]
        value = src.combine(tensors) if src.combine is not None else tensors[0]
        del tensors
        rows = _get(module, key).shape[0] if value.dim() else 0
        if value.dim() and value.shape[0] < rows:
            value = _grow_rows(value, rows)
        done.update(groups[key])
        yield groups[key][0], value


@torch.no_grad()
def materialize(
    module: nn.Module,
    plan: Plan,
    checkpoint: Checkpoint,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> None:
    """Fill ``module`` from ``checkpoint`` following ``plan`` (checked with ``check_plan`` first).

    Meta tensors are replaced by the checkpoint tensors themselves (cast to ``dtype``, else the module's
    dtype, and moved to ``device``), one at a time; tensors on a real device get the values copied in. Tied
    tensors stay tied. Rows missing from a grown embedding/head get the mean of the checkpoint's rows.
    """
    groups = _param_groups(module)
    for key, value in iter_tensors(module, plan, checkpoint):
        current = _get(module, key)
        if current.is_meta:
            _set(module, key, value.to(device=device, dtype=dtype or current.dtype).contiguous())
            shared = _get(module, key)
            for other in groups[key][1:]:  # tied: every name points at the one Parameter
                _set(module, other, shared)
        else:
            current.copy_(value)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        shown = ", ".join(left[:8]) + (f", ... ({len(left) - 8} more)" if len(left) > 8 else "")
        raise ChimeraError(f"{checkpoint.path}: {len(left)} tensors were left uninitialised: {shown}")


def iter_rename(keys: Iterable[str], renames: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """(checkpoint key, target key) for every key starting with one of ``renames``' source prefixes (the
    longest prefix wins); other keys are skipped."""
    prefixes = sorted(renames, key=len, reverse=True)
    for key in keys:
        for prefix in prefixes:
            if key.startswith(prefix):
                yield key, renames[prefix] + key[len(prefix) :]
                break
