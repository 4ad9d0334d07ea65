"""Key maps between Hugging Face checkpoints and Chimera's ``HybridDecoder`` (litgpt's one small table per
family, ``convert_hf_checkpoint.py``; the same table read backwards is the export map).

A table maps a Hugging Face template to a Chimera template; ``{}`` stands for an index (layer, expert) and
indices are carried over in order::

    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.mixer.q_proj.weight"

A Chimera template of ``None`` marks a checkpoint key that is known and skipped (e.g. old Llama checkpoints'
``rotary_emb.inv_freq`` buffers). ``Family`` bundles a table with the two config converters (HF config ->
decoder kwargs, decoder -> HF config) and an optional hook for tensors that are not one-to-one (Jamba's fused
experts).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from toolkit.convert.load import Source
from toolkit.errors import ChimeraError


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


class KeyMap:
    """Both directions of one template table."""

    def __init__(self, table: Mapping[str, str | None]) -> None:
        self.table = dict(table)
        self._forward = [(_compile(hf), ours) for hf, ours in self.table.items()]
        self._reverse = [(_compile(ours), hf) for hf, ours in self.table.items() if ours is not None]

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern[str], str | None]], key: str) -> tuple[bool, str | None]:
        for pattern, target in rules:
            match = pattern.match(key)
            if match:
                return True, None if target is None else target.format(*match.groups())
        return False, None

    def to_ours(self, hf_key: str) -> tuple[bool, str | None]:
        """(known, Chimera key or None when the key is skipped)."""
        return self._apply(self._forward, hf_key)

    def to_hf(self, key: str) -> str | None:
        return self._apply(self._reverse, key)[1]


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family as a ``HybridDecoder``.

    Attributes:
        name: family name (``llama``, ``jamba``, ``mamba``, ``mamba2``).
        model_types: the ``model_type`` values of config.json this family reads (and may write).
        base_prefix: the prefix of the base model's keys (``model.`` or ``backbone.``), where a multimodal
            wrapper's language-model keys are re-rooted.
        keymap: HF <-> Chimera key templates.
        to_decoder: HF config dict -> ``HybridDecoder`` kwargs (raises ChimeraError on what does not map).
        to_hf: (decoder, model_type) -> HF config dict (raises ChimeraError on what does not map).
        architectures: model_type -> transformers class name written to config.json.
        split: optional hook ``(hf_key, shape) -> {chimera_key: Source} | None`` for checkpoint tensors that
            feed several parameters (fused experts).
    """

    name: str
    model_types: tuple[str, ...]
    base_prefix: str
    keymap: KeyMap
    to_decoder: Callable[[Mapping[str, Any]], dict[str, Any]]
    to_hf: Callable[[nn.Module, str], dict[str, Any]]
    architectures: Mapping[str, str]
    split: Callable[[str, tuple[int, ...]], dict[str, Source] | None] | None = None


def require(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise ChimeraError(f"{where}: config.json has no '{key}'")
    return cfg[key]


def unsupported(where: str, what: str) -> ChimeraError:
    return ChimeraError(f"{where}: {what} is not supported by Chimera's decoder")
