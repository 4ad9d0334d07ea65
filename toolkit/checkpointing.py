"""Checkpoint lookup, weight loading and the consolidated export.

A run directory holds Lightning checkpoints under ``checkpoints/`` in one of two forms:

- a single file ``stepNNNNNN.ckpt`` / ``last.ckpt`` (single device, DDP, or FSDP with
  ``checkpoint_format: full``), written atomically by ``toolkit.strategies.AtomicCheckpointIO``;
- a directory of the same name (FSDP with ``checkpoint_format: sharded``): a torch.distributed.checkpoint
  (DCP) with one ``__R_0.distcp`` file per rank, DCP's ``.metadata`` and Lightning's ``meta.pt`` (loop,
  scheduler and callback state), written under ``.NAME.partial`` and renamed into place when complete.

``latest_checkpoint`` is what ``--resume`` uses; it ignores hidden (partial, temporary) entries and any
directory without both metadata files, so it never returns a half-written checkpoint. ``read_state_dict``
returns the model weights of either form in one process (no process group needed), and ``export_weights``
writes them as one consolidated file (``final.pt`` at the end of each run or stage) that a single process
loads with ``load_weights``. Paths go through fsspec wherever Lightning and DCP allow (DCP directories are
local paths).
"""

from __future__ import annotations

import io
import re
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from toolkit.errors import ChimeraError

_STEP = re.compile(r"step(\d+)")
DCP_METADATA = ".metadata"  # written last by torch.distributed.checkpoint
LIGHTNING_METADATA = "meta.pt"  # Lightning's non-tensor state, written by rank 0 after the shards


def _name(path: str) -> str:
    return PurePosixPath(path.rstrip("/")).name


def _complete(fs, path: str) -> bool:
    if fs.isdir(path):
        root = path.rstrip("/")
        return fs.exists(f"{root}/{DCP_METADATA}") and fs.exists(f"{root}/{LIGHTNING_METADATA}")
    return fs.size(path) > 0


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a torch.distributed.checkpoint directory."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    return fs.isdir(root) and fs.exists(f"{root.rstrip('/')}/{DCP_METADATA}")


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    """``last.ckpt`` if complete, else the complete checkpoint with the highest step number, else None."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(ckpt_dir))
    if not fs.exists(root):
        return None
    entries = [
        e for e in fs.ls(root, detail=False) if _name(e).endswith(".ckpt") and not _name(e).startswith(".")
    ]
    entries = [e for e in entries if _complete(fs, e)]
    last = [e for e in entries if _name(e) == "last.ckpt"]
    if last:
        return last[0]

    def step(path: str) -> int:
        match = _STEP.search(_name(path))
        return int(match.group(1)) if match else -1

    return max(entries, key=step) if entries else None


def _strip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "model."  # ChimeraModule.model
    return {
        k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in weights.items() if torch.is_tensor(v)
    }


def _read_sharded(root: str) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP directory, assembled in this process (optimizer state is not read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(root)
    metadata = reader.read_metadata()
    prefix = "state_dict."
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise ChimeraError(f"{root}: distributed checkpoint holds no model weights (no '{prefix}*' tensors)")
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {key[len(prefix) :]: value for key, value in state.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights (keys relative to the MultimodalModel) from a Lightning file, a DCP directory or an
    exported ``final.pt``."""
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
    with fs.open(root, "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=False)
    weights = state.get("state_dict", state.get("model", state))
    return _strip(weights)


def export_weights(state: dict[str, torch.Tensor] | str | Path, dest: str | Path) -> str:
    """Write model weights (a state dict, or any checkpoint ``read_state_dict`` reads) to one file, atomically.

    The file is ``{"state_dict": {name: tensor}}`` with names relative to the MultimodalModel: load it with
    ``load_weights(model, dest)`` or ``torch.load(dest)["state_dict"]``.
    """
    from toolkit.strategies import atomic_write_bytes

    weights = read_state_dict(state) if isinstance(state, (str, Path)) else state
    buffer = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in weights.items()}}, buffer)
    atomic_write_bytes(str(dest), buffer.getbuffer())
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
