"""Checkpoint lookup and weight loading (Lightning ``.ckpt`` files and FSDP2 distributed checkpoints).

Files are reached through fsspec, so checkpoint directories may live on any filesystem fsspec knows.
Lightning writes single-file checkpoints atomically (it saves to a buffer and commits it in one fsspec
transaction); ``latest_checkpoint`` prefers ``last.ckpt`` and never returns a half-written directory
(a distributed checkpoint counts only once its ``.metadata`` file, written last by torch.distributed.checkpoint,
exists).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import ChimeraError

_STEP = re.compile(r"step(\d+)")


def _complete(fs, path: str) -> bool:
    if fs.isdir(path):
        return fs.exists(f"{path.rstrip('/')}/.metadata")
    return fs.size(path) > 0


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    """``last.ckpt`` if complete, else the checkpoint with the highest step number, else None."""
    import fsspec

    fs, _, (root,) = fsspec.get_fs_token_paths(str(ckpt_dir))
    if not fs.exists(root):
        return None
    entries = [e for e in fs.ls(root, detail=False) if e.rstrip("/").endswith(".ckpt")]
    entries = [e for e in entries if _complete(fs, e)]
    last = [e for e in entries if Path(e.rstrip("/")).name == "last.ckpt"]
    if last:
        return last[0]

    def step(path: str) -> int:
        match = _STEP.search(Path(path.rstrip("/")).name)
        return int(match.group(1)) if match else -1

    return max(entries, key=step) if entries else None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights (keys relative to the MultimodalModel) from a Lightning or distributed checkpoint."""
    import fsspec

    fs, _, (root,) = fsspec.get_fs_token_paths(str(path))
    if not fs.exists(root):
        raise ChimeraError(f"{path}: checkpoint not found")
    if fs.isdir(root):  # torch.distributed.checkpoint directory: consolidate in this process
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "full.pt"
            dcp_to_torch_save(root, str(out))
            state = torch.load(out, map_location="cpu", weights_only=False)
    else:
        with fs.open(root, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=False)
    weights = state.get("state_dict", state.get("model", state))
    prefix = "model."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in weights.items() if torch.is_tensor(v)}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's weights into ``model`` (strict: every key must match)."""
    state = read_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ChimeraError(
            f"{path}: checkpoint does not match the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
