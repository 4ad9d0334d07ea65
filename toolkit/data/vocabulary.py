"""The words a configured dataset can emit, for the offline word-level tokenizer (no Lightning, no torch).

Lives apart from the datamodule so that datasets (components) can call it, e.g. a mixture collects its
parts' vocabularies, without importing Lightning.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from toolkit import registry
from toolkit.errors import ChimeraError


def dataset_vocabulary(node: Mapping[str, Any] | str, where: str = "data.train") -> list[str]:
    """The words the dataset selected by ``node`` can emit (its class's ``vocabulary()``).

    Used to build the word-level tokenizer when no tokenizer directory is configured. A ``vocabulary`` that
    takes arguments receives the node's arguments of the same names (a mixture needs its ``parts``).
    """
    name, kwargs = registry.split_node(node, "dataset", where)
    entry = registry.get("dataset", name, where)
    vocabulary = getattr(entry.target, "vocabulary", None)
    if not callable(vocabulary):
        raise ChimeraError(
            f"{where}: dataset '{name}' has no built-in vocabulary to build a word-level tokenizer from; "
            "set data.tokenizer to a local tokenizer directory"
        )
    accepted = inspect.signature(vocabulary).parameters
    return list(vocabulary(**{k: v for k, v in kwargs.items() if k in accepted}))
