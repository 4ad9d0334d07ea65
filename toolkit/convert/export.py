"""Export: the decoder as a transformers model, the whole VLM as safetensors + its resolved YAML.

``export_hf`` writes config.json + safetensors (sharded above ``max_shard_size``, with transformers'
``model.safetensors.index.json``) + the tokenizer, so ``AutoModelForCausalLM.from_pretrained(out_dir)`` gives
the decoder's logits. The family follows from the layer pattern unless given: attention + MLP everywhere ->
``llama`` (``qwen2`` with q/k/v-only biases, ``mistral`` with a sliding window), Mamba-1 without FFNs ->
``mamba``, Mamba-2 without FFNs -> ``mamba2``, attention/Mamba-1 with MLP/MoE -> ``jamba``. Keys go through
the family's key map read backwards (litgpt's ``convert_lit_checkpoint.py``); experts are written one by one,
the layout transformers 5 saves.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from toolkit.convert.hf_config import BY_MODEL_TYPE
from toolkit.convert.load import join
from toolkit.errors import ChimeraError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
VLM_WEIGHTS = "model.safetensors"
VLM_CONFIG = "config.yaml"


def _decoder(model_or_decoder: nn.Module) -> nn.Module:
    if hasattr(model_or_decoder, "layer_pattern"):
        return model_or_decoder
    decoder = getattr(model_or_decoder, "decoder", None)
    if decoder is None or not hasattr(decoder, "layer_pattern"):
        raise ChimeraError("export_hf: expected a MultimodalModel or a HybridDecoder (with a layer pattern)")
    return decoder


def infer_model_type(decoder: nn.Module) -> str:
    """The transformers model_type a decoder exports as (see the module docstring)."""
    layers = set(decoder.layer_pattern)
    if layers == {"*-"}:
        att = decoder.layers[0].mixer
        if att.q_proj.bias is not None and att.o_proj.bias is None:
            return "qwen2"
        return "mistral" if getattr(att, "sliding_window", None) is not None else "llama"
    if layers == {"m"}:
        return "mamba"
    if layers == {"M"}:
        return "mamba2"
    return "jamba"


def hf_state_dict(decoder: nn.Module, model_type: str) -> dict[str, torch.Tensor]:
    """The decoder's tensors under the family's Hugging Face names (a tied head written once, as the embedding)."""
    family = BY_MODEL_TYPE[model_type]
    tied = decoder.lm_head.weight is decoder.embed_tokens.weight
    out: dict[str, torch.Tensor] = {}
    for key, tensor in decoder.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        hf_key = family.keymap.to_hf(key)
        if hf_key is None:
            raise ChimeraError(f"export as {model_type}: no Hugging Face name for '{key}'")
        out[hf_key] = tensor
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _write_bytes(fs: Any, path: str, data: bytes | memoryview) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def write_safetensors(
    tensors: dict[str, torch.Tensor],
    out_dir: str,
    *,
    max_shard_size: int = 5 * 1024**3,
    metadata: dict | None = None,
) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index (fsspec)."""
    import fsspec
    import safetensors.torch

    fs, root = fsspec.core.url_to_fs(str(out_dir))
    fs.makedirs(root, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    shards = _shards(tensors, max_shard_size)
    names = (
        [WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    meta = {"format": "pt", **(metadata or {})}
    for name, shard in zip(names, shards):
        target = join(root, name)
        if _is_local(fs):
            safetensors.torch.save_file(shard, target, metadata=meta)
        else:
            _write_bytes(fs, target, safetensors.torch.save(shard, metadata=meta))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        with fs.open(join(root, INDEX), "w") as f:
            json.dump(index, f, indent=2)
    return names


def _save_tokenizer(tokenizer: Any, out_dir: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(out_dir))
    if _is_local(fs):
        tokenizer.save_pretrained(root)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            fs.put_file(os.path.join(tmp, name), join(root, name))


def _token_ids(tokenizer: Any) -> dict[str, Any]:
    if tokenizer is None:
        return {}
    return {
        f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None)
        for name in ("bos", "eos", "pad")
        if getattr(tokenizer, f"{name}_token_id", None) is not None
    }


def export_hf(
    model_or_decoder: nn.Module,
    tokenizer: Any,
    out_dir: str,
    family: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int = 5 * 1024**3,
) -> dict[str, Any]:
    """Write the decoder of ``model_or_decoder`` as a transformers causal LM in ``out_dir`` (any fsspec path).

    Args:
        model_or_decoder: a ``MultimodalModel`` (its decoder is written) or a ``HybridDecoder``.
        tokenizer: saved beside the weights (``save_pretrained``); None skips it.
        family: a transformers ``model_type`` (``llama``, ``mistral``, ``qwen2``, ``jamba``, ``mamba``,
            ``mamba2``), or a family name; None infers it from the layer pattern.
        dtype: the weights' dtype on disk (None: as in the model).
        max_shard_size: bytes per safetensors shard.

    Returns the config.json written. A decoder the family cannot express is a ChimeraError naming why.
    """
    import fsspec

    from toolkit.convert.decoder import resolve_dtype

    decoder = _decoder(model_or_decoder)
    model_type = family or infer_model_type(decoder)
    if model_type not in BY_MODEL_TYPE:
        raise ChimeraError(
            f"export: unknown family '{model_type}'; one of {', '.join(sorted(BY_MODEL_TYPE))}"
        )
    fam = BY_MODEL_TYPE[model_type]
    cfg = fam.to_hf(decoder, model_type)
    tensors = hf_state_dict(decoder, model_type)
    target_dtype = resolve_dtype(dtype)
    if target_dtype is not None:
        tensors = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    floats = [v.dtype for v in tensors.values() if v.is_floating_point()]
    if floats:
        cfg["dtype"] = str(max(set(floats), key=floats.count)).removeprefix("torch.")
    cfg |= _token_ids(tokenizer)
    fs, root = fsspec.core.url_to_fs(str(out_dir))
    fs.makedirs(root, exist_ok=True)
    write_safetensors(tensors, out_dir, max_shard_size=max_shard_size)
    with fs.open(join(root, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out_dir)
    return cfg


def export_vlm(
    model: nn.Module,
    cfg_yaml_text: str,
    out_dir: str,
    *,
    tokenizer: Any = None,
    parts: Iterable[str] | None = None,
) -> list[str]:
    """The whole VLM: ``model.safetensors`` (keys relative to the model, as ``final.safetensors``; load with
    ``toolkit.checkpointing.load_weights`` or an ``init: {path: ..., layout: chimera}``) and ``config.yaml``,
    the resolved experiment YAML that rebuilds it; the tokenizer beside them when given. Returns the files."""
    import fsspec

    from toolkit.checkpointing import _unshared

    state = model.state_dict()
    if parts is not None:
        keep = tuple(f"{p}." for p in parts)
        state = {k: v for k, v in state.items() if k.startswith(keep)}
    fs, root = fsspec.core.url_to_fs(str(out_dir))
    fs.makedirs(root, exist_ok=True)
    names = write_safetensors(_unshared(state), out_dir, metadata={"chimera": "chimera.state_dict"})
    with fs.open(join(root, VLM_CONFIG), "w") as f:
        f.write(cfg_yaml_text)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out_dir)
    return [*names, VLM_CONFIG]
