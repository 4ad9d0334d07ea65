"""Checkpoint lookup, safe weight loading, recovery and the consolidated export.

A run directory holds Lightning checkpoints under ``checkpoints/`` in one of two forms:

- a single file ``stepNNNNNN.ckpt`` / ``last.ckpt`` (single device, DDP, or FSDP with
  ``checkpoint_format: full``), written atomically by ``toolkit.strategies.AtomicCheckpointIO``;
- a directory of the same name (FSDP with ``checkpoint_format: sharded``): a torch.distributed.checkpoint
  (DCP) with one ``__R_0.distcp`` file per rank, DCP's ``.metadata`` and Lightning's ``meta.pt`` (loop,
  scheduler and callback state), written under ``.NAME.partial`` and renamed into place when complete.

Nothing here unpickles arbitrary objects. Torch files are read with ``torch.load(weights_only=True)``
(``safe_torch_load``); a Lightning checkpoint needs nothing more (its loop, callback, optimizer and
hyper-parameter state are plain dicts, lists, numbers, strings and tensors). DCP's ``.metadata`` is a plain
pickle that torch reads with ``pickle.load``: ``read_dcp_metadata`` reads it with an unpickler that only
accepts DCP's own metadata dataclasses, ``torch.Size``, dtypes, layouts and paths. The consolidated export
is a safetensors file (``FINAL_WEIGHTS``), which holds tensors only; an older run's ``final.pt`` still loads
(safely).

``--resume`` should use ``loadable_checkpoint``: it tries ``last.ckpt``, then the step checkpoints from the
highest step down, and returns the newest one that actually loads (a truncated file, an empty file or a
directory without metadata is skipped, with the reason). ``clean_stale_temporaries`` removes what a killed
writer left behind (``.NAME.tmp-PID-xxxxxx`` files, ``.NAME.partial`` / ``.NAME.old-xxxxxxxx`` directories).
``latest_checkpoint`` is the cheap name-and-size lookup (no file is opened).

``read_state_dict`` returns the model weights of any form in one process (no process group needed),
``export_weights`` writes them as one consolidated file and ``load_weights`` loads one into a model.
Paths go through fsspec wherever Lightning and DCP allow (DCP directories are local paths).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from toolkit.errors import ChimeraError

_STEP = re.compile(r"step(\d+)")
DCP_METADATA = ".metadata"  # written last by torch.distributed.checkpoint
LIGHTNING_METADATA = "meta.pt"  # Lightning's non-tensor state, written by rank 0 after the shards
LAST = "last.ckpt"
FINAL_WEIGHTS = "final.safetensors"  # the consolidated weights at the end of a run or stage
LEGACY_FINAL_WEIGHTS = "final.pt"  # what runs wrote before FINAL_WEIGHTS; still read (safely)
_SAFETENSORS_FORMAT = "chimera.state_dict"  # metadata["format"] of an exported file

# What a killed writer leaves next to a checkpoint (see toolkit.strategies): atomic_write_bytes' temporary
# file, FSDP2Strategy's in-progress directory and replace_dir's old directory.
_STALE_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")
_STALE_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial$")
_STALE_OLD = re.compile(r"^\.(?P<name>.+)\.old-[0-9a-f]+$")


def _name(path: str) -> str:
    return PurePosixPath(path.rstrip("/")).name


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _complete(fs, path: str) -> bool:
    if fs.isdir(path):
        root = path.rstrip("/")
        return fs.exists(f"{root}/{DCP_METADATA}") and fs.exists(f"{root}/{LIGHTNING_METADATA}")
    return fs.size(path) > 0


def _step(path: str) -> int:
    match = _STEP.search(_name(path))
    return int(match.group(1)) if match else -1


def _first_line(error: BaseException) -> str:
    """A one-line summary of an exception (torch's weights-only errors are paragraphs)."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:  # the line that names the refused global or opcode
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    summary = lines[0] if lines else type(error).__name__
    if summary and not summary.startswith(type(error).__name__):
        summary = f"{type(error).__name__}: {summary}"
    return summary[:300]


# --------------------------------------------------------------------------------------------- safe loading
def _local_file_problem(path: str) -> str | None:
    """Cheap checks of a local torch file: empty, or a zip archive cut short (its directory is at the end)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        return "file not found"
    if size == 0:
        return "empty file (0 bytes)"
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return f"truncated: the zip archive has no central directory ({size} bytes)"
    return None


def safe_torch_load(path: str | Path, *, mmap: bool | None = None) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")``; any failure is a ChimeraError naming the file.

    Local zip files (everything ``torch.save`` writes) are memory-mapped by default, so tensors are only read
    when used. A file holding anything but tensors and plain data (a class, a function: what a malicious
    pickle needs) is refused before any of it runs.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols while refusing a file
            if _is_local(fs):
                problem = _local_file_problem(root)
                if problem:
                    raise ChimeraError(f"{path}: cannot read this torch file: {problem}")
                use_mmap = zipfile.is_zipfile(root) if mmap is None else mmap
                return torch.load(root, map_location="cpu", weights_only=True, mmap=use_mmap)
            with fs.open(root, "rb") as f:
                return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except ChimeraError:
        raise
    except FileNotFoundError as e:
        raise ChimeraError(f"{path}: file not found") from e
    except pickle.UnpicklingError as e:
        raise ChimeraError(
            f"{path}: refusing to load: the file holds objects other than tensors and plain data "
            f"({_first_line(e)}); it is not a checkpoint Chimera wrote, or it was tampered with"
        ) from e
    except Exception as e:  # truncated zip, empty file, bad magic number, ...
        raise ChimeraError(f"{path}: cannot read this torch file: {_first_line(e)}") from e


_DCP_MODULE = "torch.distributed.checkpoint"


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and refuses every global a metadata file does not need."""

    _TORCH_TYPES = (torch.dtype, torch.layout, torch.memory_format)
    _ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
        ("pathlib", "Path"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "WindowsPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        import dataclasses
        import enum
        import sys

        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), self._TORCH_TYPES):
            return getattr(torch, name)
        if module == _DCP_MODULE or module.startswith(_DCP_MODULE + "."):
            obj = getattr(sys.modules.get(module), name, None)  # only modules torch has imported itself
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} is not DCP metadata")


def read_dcp_metadata(path: str | Path):
    """The ``torch.distributed.checkpoint.metadata.Metadata`` of a DCP directory, read without running code."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401  (the classes the unpickler may return)
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    file = Path(path) / DCP_METADATA
    try:
        with open(file, "rb") as f:
            metadata = _DcpMetadataUnpickler(f).load()
    except FileNotFoundError as e:
        raise ChimeraError(f"{file}: file not found (an incomplete distributed checkpoint)") from e
    except pickle.UnpicklingError as e:
        raise ChimeraError(f"{file}: refusing to load: {_first_line(e)}") from e
    except Exception as e:
        raise ChimeraError(f"{file}: cannot read distributed checkpoint metadata: {_first_line(e)}") from e
    if not isinstance(metadata, Metadata):
        raise ChimeraError(f"{file}: not distributed checkpoint metadata (a {type(metadata).__name__})")
    if getattr(metadata, "storage_meta", None) is None:  # what FileSystemReader.read_metadata does
        metadata.storage_meta = StorageMeta()
    return metadata


def _safe_dcp_reader(root: str):
    """DCP's FileSystemReader with ``read_metadata`` replaced by ``read_dcp_metadata``."""
    import torch.distributed.checkpoint as dcp

    class SafeFileSystemReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            if kwargs.get("rank") is not None:
                raise ChimeraError(f"{root}: per-rank DCP metadata is not supported")
            metadata = read_dcp_metadata(root)
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return SafeFileSystemReader(root)


# --------------------------------------------------------------------------------------------- lookup
def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a torch.distributed.checkpoint directory."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    return fs.isdir(root) and fs.exists(f"{root.rstrip('/')}/{DCP_METADATA}")


def _candidates(fs, root: str) -> list[str]:
    """Checkpoint entries of a directory, newest first: ``last.ckpt``, then by step number (highest first)."""
    entries = [
        e for e in fs.ls(root, detail=False) if _name(e).endswith(".ckpt") and not _name(e).startswith(".")
    ]
    return sorted(entries, key=lambda e: (_name(e) != LAST, -_step(e), _name(e)))


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    """``last.ckpt`` if complete, else the complete checkpoint with the highest step number, else None.

    Cheap (names and sizes only): a truncated file is returned all the same. ``--resume`` should use
    ``loadable_checkpoint``, which opens the candidates.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(ckpt_dir))
    if not fs.exists(root):
        return None
    for entry in _candidates(fs, root):
        if _complete(fs, entry):
            return entry
    return None


def _check_file(fs, path: str, verify: bool) -> str | None:
    size = fs.size(path)
    if size == 0:
        return "empty file (0 bytes)"
    if _is_local(fs):
        if not zipfile.is_zipfile(path):
            return _local_file_problem(path) or f"not a torch checkpoint: not a zip archive ({size} bytes)"
        if verify:
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError) as e:
                return f"corrupt zip archive: {_first_line(e)}"
            if bad is not None:
                return f"corrupt: member {bad} fails its CRC check"
        try:
            state = safe_torch_load(path)
        except ChimeraError as e:
            return str(e).removeprefix(f"{path}: ")
    else:  # a remote file: check the zip directory without downloading the whole checkpoint
        try:
            with fs.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return f"truncated or not a torch checkpoint: {_first_line(e)}"
        if not any(n.endswith("/data.pkl") for n in names):
            return "not a torch checkpoint: the zip archive has no data.pkl"
        return None
    if not isinstance(state, dict) or "state_dict" not in state:
        return "not a Lightning checkpoint (no 'state_dict' entry)"
    return None


def _check_sharded(root: str) -> str | None:
    base = Path(root)
    for required in (DCP_METADATA, LIGHTNING_METADATA):
        if not (base / required).is_file():
            return f"incomplete distributed checkpoint: no {required}"
    try:
        metadata = read_dcp_metadata(base)
    except ChimeraError as e:
        return str(e).removeprefix(f"{base / DCP_METADATA}: ")
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    storage = getattr(metadata, "storage_data", None) or {}
    ends: dict[str, int] = {}
    for info in storage.values():
        rel = str(getattr(info, "relative_path", ""))
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(ends.items()):
        file = base / rel
        if not file.is_file():
            return f"missing shard file {rel}"
        if file.stat().st_size < end:
            return f"truncated shard file {rel} ({file.stat().st_size} of {end} bytes)"
    # Non-tensor items (optimizer hyper-parameters, ...) are torch.save'd into the shards, and DCP's planner
    # loads them with weights_only=False when Lightning resumes: vet every one of them here.
    for index, info in storage.items():
        item = metadata.state_dict_metadata.get(getattr(index, "fqn", None))
        if not isinstance(item, BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            return (
                f"{index.fqn}: stored with transforms {info.transform_descriptors}, which cannot be checked"
            )
        with open(base / info.relative_path, "rb") as f:
            f.seek(int(info.offset))
            data = f.read(int(info.length))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            return f"refusing to load item {index.fqn} of {info.relative_path}: {_first_line(e)}"
        except Exception as e:
            return f"unreadable item {index.fqn} of {info.relative_path}: {_first_line(e)}"
    try:
        meta = safe_torch_load(base / LIGHTNING_METADATA)
    except ChimeraError as e:
        return f"{LIGHTNING_METADATA}: " + str(e).removeprefix(f"{base / LIGHTNING_METADATA}: ")
    if not isinstance(meta, dict):
        return f"{LIGHTNING_METADATA} is not a dict"
    return None


def checkpoint_problem(path: str | Path, *, verify: bool = False) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it loads.

    A single file must be a complete zip archive whose pickled part loads with ``weights_only=True`` and
    holds a ``state_dict`` (local files are memory-mapped: tensor data is not read; remote files only get
    the zip directory check). ``verify=True`` also checks every member's CRC (reads the whole file). A DCP
    directory needs both metadata files readable without running code, every shard file at least as long
    as the metadata says, and its non-tensor items loadable with ``weights_only=True``.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    if not fs.exists(root):
        return "not found"
    if fs.isdir(root):
        if not _is_local(fs):
            return "distributed checkpoints must be local directories"
        return _check_sharded(root)
    return _check_file(fs, root, verify)


def loadable_checkpoint(
    ckpt_dir: str | Path, *, verify: bool = False
) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest checkpoint under ``ckpt_dir`` that loads, or None; [(skipped path, reason), ...]).

    Candidates are ``last.ckpt``, then ``stepNNNNNN.ckpt`` from the highest step down (files or DCP
    directories; hidden entries are temporaries and never candidates). The skipped ones are those tried
    before the returned one, newest first, each with the reason from ``checkpoint_problem``.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(ckpt_dir))
    skipped: list[tuple[str, str]] = []
    if not fs.exists(root):
        return None, skipped
    for entry in _candidates(fs, root):
        problem = checkpoint_problem(entry if _is_local(fs) else fs.unstrip_protocol(entry), verify=verify)
        if problem is None:
            return entry if _is_local(fs) else fs.unstrip_protocol(entry), skipped
        skipped.append((entry, problem))
    return None, skipped


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing while it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_temporaries(ckpt_dir: str | Path) -> list[str]:
    """Remove what killed writers left in ``ckpt_dir`` (not recursive); returns the removed paths.

    Only hidden entries matching one of the writers' patterns are touched: ``.NAME.tmp-PID-HEX`` files
    (``atomic_write_bytes``; kept while process PID is alive on this host), ``.NAME.partial`` and
    ``.NAME.old-HEX`` directories (``FSDP2Strategy`` / ``replace_dir``). Call it on rank 0 before training
    starts, while no checkpoint of this run is being written.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(ckpt_dir))
    if not fs.isdir(root):
        return []
    removed = []
    for entry in fs.ls(root, detail=False):
        name = _name(entry)
        tmp = _STALE_TMP.match(name)
        if tmp:
            if _is_local(fs) and _pid_alive(int(tmp.group("pid"))):
                continue
        elif not (_STALE_PARTIAL.match(name) or _STALE_OLD.match(name)):
            continue
        if _is_local(fs):
            path = Path(entry)
            if path.is_symlink() or not path.is_dir():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
        else:
            fs.rm(entry, recursive=True)
        removed.append(entry)
    return removed


def final_weights(run_dir: str | Path) -> str | None:
    """The consolidated weights a run or stage directory holds (``FINAL_WEIGHTS``, else a legacy
    ``final.pt``), or None."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(run_dir))
    for name in (FINAL_WEIGHTS, LEGACY_FINAL_WEIGHTS):
        candidate = f"{root.rstrip('/')}/{name}"
        if fs.isfile(candidate):
            return candidate if _is_local(fs) else fs.unstrip_protocol(candidate)
    return None


# --------------------------------------------------------------------------------------------- weights
def _strip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "model."  # ChimeraModule.model
    return {
        k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in weights.items() if torch.is_tensor(v)
    }


def _read_sharded(root: str) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP directory, assembled in this process (optimizer state is not read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _safe_dcp_reader(root)
    metadata = reader.read_metadata()
    prefix = "state_dict."
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise ChimeraError(f"{root}: distributed checkpoint holds no model weights (no '{prefix}*' tensors)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
            dcp.load(state, storage_reader=reader, no_dist=True)  # tensors: torch.load(weights_only=True)
    except ChimeraError:
        raise
    except Exception as e:
        raise ChimeraError(f"{root}: cannot read the distributed checkpoint: {_first_line(e)}") from e
    return {key[len(prefix) :]: value for key, value in state.items()}


def _magic(fs, root: str) -> bytes:
    with fs.open(root, "rb") as f:
        return f.read(9)


def _is_safetensors(head: bytes) -> bool:
    """A safetensors file starts with its JSON header's length (u64, little endian), then ``{``."""
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _read_safetensors(fs, root: str, path: str | Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        if _is_local(fs):
            return safetensors.torch.load_file(root, device="cpu")
        with fs.open(root, "rb") as f:
            return safetensors.torch.load(f.read())
    except Exception as e:
        raise ChimeraError(f"{path}: cannot read this safetensors file: {_first_line(e)}") from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights (keys relative to the MultimodalModel) from a Lightning file, a DCP directory or an
    exported ``final.safetensors`` / ``final.pt``. Never runs code from the file: a file with anything but
    tensors and plain data raises ChimeraError."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    if not fs.exists(root):
        raise ChimeraError(f"{path}: checkpoint not found")
    if fs.isdir(root):
        if not _complete(fs, root):
            raise ChimeraError(
                f"{path}: incomplete distributed checkpoint (no {DCP_METADATA} or {LIGHTNING_METADATA})"
            )
        return _strip(_read_sharded(root))
    head = _magic(fs, root)
    if _is_safetensors(head):
        return _read_safetensors(fs, root, path)
    if str(root).endswith(".safetensors"):
        raise ChimeraError(f"{path}: not a safetensors file (bad header); refusing to load it any other way")
    state = safe_torch_load(path)
    if not isinstance(state, dict):
        raise ChimeraError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    weights = state.get("state_dict", state.get("model", state))
    if not isinstance(weights, dict):
        raise ChimeraError(f"{path}: not a checkpoint (its state_dict is a {type(weights).__name__})")
    return _strip(weights)


def _unshared(weights: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses tied or overlapping tensors); a tied
    tensor is written once per name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in weights.items():
        if not torch.is_tensor(value):
            continue
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr and ptr in seen:
            tensor = tensor.clone()
        elif ptr:
            seen.add(ptr)
        out[key] = tensor
    return out


def export_weights(state: dict[str, torch.Tensor] | str | Path, dest: str | Path) -> str:
    """Write model weights (a state dict, or any checkpoint ``read_state_dict`` reads) to one file, atomically.

    ``dest`` ending in ``.safetensors`` (``FINAL_WEIGHTS``) gets a safetensors file of ``{name: tensor}``;
    any other name gets ``torch.save({"state_dict": {name: tensor}})``. Names are relative to the
    MultimodalModel; load either with ``load_weights(model, dest)`` or ``read_state_dict(dest)``.
    """
    from toolkit.strategies import atomic_write_bytes

    weights = read_state_dict(state) if isinstance(state, (str, Path)) else state
    if str(dest).endswith(".safetensors"):
        import safetensors.torch

        data: bytes | memoryview = safetensors.torch.save(
            _unshared(weights), metadata={"format": "pt", "chimera": _SAFETENSORS_FORMAT}
        )
    else:
        buffer = io.BytesIO()
        torch.save(
            {"state_dict": {k: v.detach().cpu() for k, v in weights.items() if torch.is_tensor(v)}}, buffer
        )
        data = buffer.getbuffer()
    atomic_write_bytes(str(dest), data)
    return str(dest)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's weights into ``model`` (strict: every key must match)."""
    state = read_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ChimeraError(
            f"{path}: checkpoint does not match the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
