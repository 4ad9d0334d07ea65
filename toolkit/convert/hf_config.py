"""Hugging Face ``config.json`` <-> ``HybridDecoder`` kwargs, for every family in ``FAMILIES``.

``read_config(path)`` reads a directory's config.json through fsspec. ``resolve(cfg)`` finds the family and,
for multimodal wrappers, where the language model's keys live:

- a causal LM (``llama``, ``mistral``, ``qwen2``, ``jamba``, ``mamba``, ``mamba2``): keys as saved;
- transformers' ``LlavaForConditionalGeneration`` (``model_type: llava`` with a ``text_config``): the language
  model's keys under ``model.language_model.`` (transformers 5) or ``language_model.model.`` (4.x), the head at
  ``lm_head.`` / ``language_model.lm_head.``; the vision tower and projector belong to other parts;
- LLaVA's own checkpoints (``llava_llama``, ``llava_mistral``, ``llava_qwen2``...; LongLLaVA's ``llava_jamba``;
  LLaVA-1.5's ``llava`` without ``text_config``): the language model's config at the top level and its keys
  as saved, plus ``model.mm_projector.*`` / ``model.vision_tower.*``, which belong to other parts.

``decoder_kwargs(path)`` is what a user's ``init: {hf: PATH}`` expands to: the decoder's shape, from the
checkpoint's config, so the user writes the path and not the widths.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from toolkit.convert import jamba, llama, mamba, mamba2
from toolkit.convert.keymap import Family
from toolkit.convert.load import join
from toolkit.errors import ChimeraError

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, jamba.FAMILY, mamba.FAMILY, mamba2.FAMILY)}
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}

# keys of a multimodal checkpoint that belong to the vision tower or the projector, not the decoder
MULTIMODAL_PREFIXES = (
    "model.mm_projector.",
    "model.vision_tower.",
    "model.vision_resampler.",
    "model.image_newline",
    "model.multi_modal_projector.",
    "vision_tower.",
    "multi_modal_projector.",
    "image_newline",
)


@dataclass
class Layout:
    """Where a family's keys sit in a checkpoint: ``renames`` (checkpoint prefix -> family prefix) applied
    first, and ``skip`` prefixes of keys that belong to other parts."""

    family: Family
    config: dict[str, Any]  # the language model's config
    model_type: str
    renames: dict[str, str] = field(default_factory=dict)
    skip: tuple[str, ...] = ()

    def to_family_key(self, key: str) -> str | None:
        """A checkpoint key in the family's own naming, or None if it belongs to another part."""
        for src, dst in sorted(self.renames.items(), key=lambda kv: -len(kv[0])):
            if key.startswith(src):
                return dst + key[len(src) :]
        if key.startswith(self.skip):
            return None
        return key


def read_config(path: str) -> dict[str, Any]:
    """config.json of a Hugging Face directory (any fsspec path)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    file = join(root, "config.json")
    if not fs.exists(root):
        raise ChimeraError(f"{path}: Hugging Face directory not found")
    if not fs.exists(file):
        raise ChimeraError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        with fs.open(file, "r") as f:
            cfg = json.load(f)
    except ValueError as exc:
        raise ChimeraError(f"{path}/config.json: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ChimeraError(f"{path}/config.json: expected a JSON object")
    return cfg


def resolve(cfg: Mapping[str, Any], where: str = "config.json") -> Layout:
    """The family and key layout of a checkpoint's config (see the module docstring)."""
    model_type = str(cfg.get("model_type", ""))
    if model_type in BY_MODEL_TYPE:
        return Layout(BY_MODEL_TYPE[model_type], dict(cfg), model_type)
    if isinstance(cfg.get("text_config"), Mapping):  # transformers' Llava-style wrapper
        text = dict(cfg["text_config"])
        inner = str(text.get("model_type", "llama"))
        family = _family(inner, where)
        base = family.base_prefix
        renames = {
            "model.language_model.": base,
            "language_model.model.": base,
            "language_model.backbone.": base,
            "language_model.lm_head.": "lm_head.",
        }
        return Layout(family, text | {"model_type": inner}, inner, renames, MULTIMODAL_PREFIXES)
    if model_type.startswith("llava"):  # LLaVA's / LongLLaVA's own checkpoints: LM config at the top level
        inner = model_type.removeprefix("llava").lstrip("_") or "llama"
        family = _family(inner, where)
        return Layout(family, dict(cfg) | {"model_type": inner}, inner, {}, MULTIMODAL_PREFIXES)
    raise ChimeraError(
        f"{where}: model_type '{model_type}' is not supported; supported: "
        f"{', '.join(sorted(BY_MODEL_TYPE))} (and LLaVA wrappers around them)"
    )


def _family(model_type: str, where: str) -> Family:
    if model_type not in BY_MODEL_TYPE:
        raise ChimeraError(
            f"{where}: language model type '{model_type}' is not supported; supported: "
            f"{', '.join(sorted(BY_MODEL_TYPE))}"
        )
    return BY_MODEL_TYPE[model_type]


def decoder_kwargs(path: str) -> dict[str, Any]:
    """``HybridDecoder`` kwargs (shape, pattern, norms, RoPE) from a Hugging Face directory's config.json."""
    cfg = read_config(path)
    layout = resolve(cfg, f"{path}/config.json")
    try:
        return layout.family.to_decoder(layout.config)
    except ChimeraError as exc:
        raise ChimeraError(f"{path}: {exc}") from exc


def checkpoint_dtype(cfg: Mapping[str, Any]) -> str | None:
    """The dtype a config says its weights are in (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else {}
    return cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
