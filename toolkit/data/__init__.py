"""The data layer: LLaVA-format samples -> tokens with image slots -> batches, plus a synthetic suite.

- ``tokenizer``:    special tokens, an offline word-level tokenizer, loading a local pretrained one.
- ``conversation``: the prompt template (Vicuna v1 with LongLLaVA's ``<img><image></img>`` markup).
- ``collate``:      ``encode`` one sample, ``Collator`` for batches (the documented batch contract).
- ``synthetic``:    ``synthetic_shapes``, procedural coloured-shape VQA (registered dataset).
- ``datamodule``:   ``ChimeraDataModule``, ``SeededSampler``, ``dataset_vocabulary``.

Names are imported lazily, so importing ``toolkit.data.synthetic`` (an entry point) does not pull in
transformers or Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BOS": "tokenizer",
    "EOS": "tokenizer",
    "FRAME_SEP": "tokenizer",
    "IMAGE": "tokenizer",
    "IMG_END": "tokenizer",
    "IMG_START": "tokenizer",
    "PAD": "tokenizer",
    "SPECIAL_TOKENS": "tokenizer",
    "UNK": "tokenizer",
    "VID_END": "tokenizer",
    "VID_START": "tokenizer",
    "build_word_tokenizer": "tokenizer",
    "image_token_id": "tokenizer",
    "load_tokenizer": "tokenizer",
    "render": "conversation",
    "IGNORE_INDEX": "collate",
    "Collator": "collate",
    "encode": "collate",
    "SyntheticShapes": "synthetic",
    "ChimeraDataModule": "datamodule",
    "SeededSampler": "datamodule",
    "dataset_vocabulary": "datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'toolkit.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"toolkit.data.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
