"""The data machinery: LLaVA-format samples -> prompt template -> tokens with image slots -> batches.

Datasets are components (``components/datasets``), and so are prompt templates (``components/templates``);
this package holds what they share:

- ``markup``:     special-token and image-markup names (plain strings, no imports).
- ``template``:   the template machinery: conversation checks, segments -> ids + assistant mask,
                  ``build_template`` (``data.template``, default ``vicuna_v1``).
- ``tokenizer``:  an offline word-level tokenizer (dataset words + the template's), loading a local one.
- ``collate``:    ``encode`` one sample, ``Collator`` for batches (the documented batch contract).
- ``vocabulary``: ``dataset_vocabulary``, the words a configured dataset can emit.
- ``datamodule``: ``ChimeraDataModule``, ``SeededSampler`` (the only module importing Lightning).

Dependencies point one way: markup <- template <- tokenizer <- collate <- datamodule. Names are imported
lazily, so importing ``toolkit.data`` (or a component that uses ``toolkit.data.template``) pulls in neither
transformers nor Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BOS": "markup",
    "EOS": "markup",
    "FRAME_SEP": "markup",
    "IMAGE": "markup",
    "IMG_END": "markup",
    "IMG_START": "markup",
    "MARKUP_TOKENS": "markup",
    "PAD": "markup",
    "SPECIAL_TOKENS": "markup",
    "UNK": "markup",
    "VID_END": "markup",
    "VID_START": "markup",
    "Encoded": "template",
    "build_template": "template",
    "build_word_tokenizer": "tokenizer",
    "image_token_id": "tokenizer",
    "load_tokenizer": "tokenizer",
    "IGNORE_INDEX": "collate",
    "Collator": "collate",
    "encode": "collate",
    "dataset_vocabulary": "vocabulary",
    "ChimeraDataModule": "datamodule",
    "SeededSampler": "datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'toolkit.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"toolkit.data.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
