"""A ``HybridDecoder`` from a Hugging Face directory: config.json -> decoder kwargs, checkpoint -> weights.

The decoder is built on the meta device and every checkpoint tensor is read lazily and becomes the parameter
itself (``load.materialize``): peak memory is about one copy of the weights and nothing is initialised at
random first. Missing, unexpected and mis-shaped keys are reported together, by name, before anything is read.
Embedding and head rows the checkpoint lacks (tokens appended to its tokenizer, such as the image markup) start
at the mean of the checkpoint's rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from toolkit.convert.hf_config import Layout, checkpoint_dtype, read_config, resolve
from toolkit.convert.load import Checkpoint, Plan, Source, check_plan, iter_tensors, materialize
from toolkit.errors import ChimeraError

GROWABLE = ("embed_tokens.weight", "lm_head.weight")


def resolve_dtype(dtype: str | torch.dtype | None, cfg: dict[str, Any] | None = None) -> torch.dtype | None:
    """None, a torch dtype, a name (``bfloat16``, ``float32``, ...) or ``auto`` (the checkpoint's own)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return resolve_dtype(checkpoint_dtype(cfg or {}))
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ChimeraError(f"unknown dtype '{dtype}' (e.g. float32, bfloat16, float16, auto)")
    return value


def hf_plan(decoder: nn.Module, checkpoint: Checkpoint, layout: Layout) -> Plan:
    """Checkpoint keys -> decoder keys through the family's key map (and its split hook)."""
    family, plan = layout.family, Plan()
    for key in checkpoint.names():
        family_key = layout.to_family_key(key)
        if family_key is None:  # another part's weights (vision tower, projector)
            continue
        known, ours = family.keymap.to_ours(family_key)
        if known:
            if ours is not None:
                plan.sources[ours] = Source((key,), checkpoint.shape(key))
            continue
        parts = family.split(family_key, checkpoint.shape(key)) if family.split else None
        if parts is None:
            plan.unused.append(key)
            continue
        for ours, src in parts.items():
            plan.sources[ours] = Source((key,), src.shape, src.combine)
    if _tied(decoder):  # the head is the embedding: a saved head is ignored, as transformers does
        plan.sources.pop("lm_head.weight", None)
    return plan


def _tied(decoder: nn.Module) -> bool:
    return decoder.lm_head.weight is decoder.embed_tokens.weight


def hf_tensors(decoder: nn.Module, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(decoder key, tensor)`` pairs of a Hugging Face checkpoint, checked against ``decoder`` (which may be
    on meta or sharded: only names and shapes are read) and yielded one tensor at a time, for loaders that put
    tensors in place themselves (e.g. straight into FSDP shards)."""
    layout = resolve(read_config(path), f"{path}/config.json")
    checkpoint = Checkpoint(path)
    plan = hf_plan(decoder, checkpoint, layout)
    optional = ["lm_head.weight"] if _tied(decoder) else []
    check_plan(plan, decoder, f"{path} ({layout.model_type})", optional=optional, grow_rows=GROWABLE)
    yield from iter_tensors(decoder, plan, checkpoint)


def load_hf_weights(
    decoder: nn.Module,
    path: str,
    *,
    layout: Layout | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> None:
    """Load a Hugging Face checkpoint's language-model weights into ``decoder`` (strict).

    A decoder on the meta device is materialised from the checkpoint tensors (cast to ``dtype``, or the
    decoder's dtype, and moved to ``device`` one at a time); a real one gets the values copied in.
    """
    cfg = read_config(path) if layout is None else None
    layout = layout or resolve(cfg, f"{path}/config.json")
    checkpoint = Checkpoint(path)
    plan = hf_plan(decoder, checkpoint, layout)
    optional = ["lm_head.weight"] if _tied(decoder) else []
    check_plan(plan, decoder, f"{path} ({layout.model_type})", optional=optional, grow_rows=GROWABLE)
    materialize(decoder, plan, checkpoint, dtype=resolve_dtype(dtype, cfg), device=device)


def decoder_from_hf(
    path: str,
    *,
    vocab_size: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """A ``HybridDecoder`` with the shape and weights of the Hugging Face model at ``path``.

    Args:
        path: a local or fsspec directory with config.json and safetensors (or ``pytorch_model.bin``) weights.
        vocab_size: grow the embedding and head to this many rows (new rows = the mean row), e.g.
            ``len(tokenizer)`` after the image markup was added; never shrinks.
        dtype: parameter dtype (``auto``: the checkpoint's; None: the default dtype).
        device: where the parameters end up (tensors move one at a time).
        overrides: extra decoder kwargs merged over the checkpoint's (e.g. ``{"mixers": {"mamba":
            {"use_kernels": "never"}}}``); a shape that contradicts config.json is an error.

    Under a default device of ``meta`` (planning, ``chimera describe``) nothing is read but config.json.
    """
    from toolkit.convert.parts import decoder_node
    from toolkit.registry import build

    cfg = read_config(path)
    layout = resolve(cfg, f"{path}/config.json")
    node = decoder_node({"init": {"hf": path}, **(overrides or {})}, "model.decoder", vocab_size=vocab_size)
    planning = _default_device() == torch.device("meta")
    with contextlib.nullcontext() if planning else torch.device("meta"):
        decoder = build("decoder", node, "model.decoder")
    if planning:
        return decoder
    load_hf_weights(decoder, path, layout=layout, dtype=dtype, device=device)
    return decoder


def _default_device() -> torch.device:
    getter = getattr(torch, "get_default_device", None)
    return getter() if getter is not None else torch.empty(0).device
