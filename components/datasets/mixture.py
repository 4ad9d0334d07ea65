"""``mixture``: a weighted, deterministic mixture of registered datasets (replay of earlier stages' data).

Used by staged recipes, e.g. LongLLaVA's stage 3 trains on multi-image data with replay of single-image
data::

    train:
      name: mixture
      weights: [0.7, 0.3]
      parts:
        - {name: synthetic_shapes, images_per_sample: 2, tasks: [compare, color]}
        - {name: synthetic_shapes, tasks: [color, shape]}

Part ``k`` fills ``round(size * weights[k] / sum(weights))`` positions (largest-remainder rounding, so the
counts add up to ``size``); positions are interleaved by a seeded permutation, so an unshuffled (validation)
loader sees the mix too. A part asked for more samples than it holds repeats them; a part asked for fewer is
subsampled evenly. The mapping depends only on (parts, weights, size, seed): every rank, worker and epoch
sees the same dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from toolkit import registry
from toolkit.errors import ChimeraError


def _check(parts: Any, weights: Any, where: str) -> None:
    if not isinstance(parts, Sequence) or isinstance(parts, (str, bytes)) or not parts:
        raise ChimeraError(
            f"{where}.parts: expected a non-empty list of dataset nodes, got {parts!r}", key=f"{where}.parts"
        )
    if weights is not None:
        if not isinstance(weights, Sequence) or len(weights) != len(parts):
            raise ChimeraError(
                f"{where}.weights: expected {len(parts)} weights (one per part), got {weights!r}",
                key=f"{where}.weights",
            )
        if any(float(w) < 0 for w in weights) or sum(float(w) for w in weights) <= 0:
            raise ChimeraError(
                f"{where}.weights: weights must be >= 0 with a positive sum, got {list(weights)}",
                key=f"{where}.weights",
            )


def _counts(size: int, weights: Sequence[float]) -> list[int]:
    """Largest-remainder apportionment of ``size`` positions to ``weights``."""
    total = sum(weights)
    exact = [size * w / total for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: size - sum(counts)]:
        counts[k] += 1
    return counts


@registry.register("dataset", "mixture")
class Mixture(Dataset):
    """A weighted mixture of dataset nodes (deterministic; see the module docstring).

    Args:
        parts: dataset nodes ``{name: ..., **kwargs}``; each is built with the derived ``image_size``.
        weights: relative share of each part; default: proportional to the parts' sizes (a concatenation).
        size: number of samples; default: the sum of the parts' sizes.
        seed: seeds the interleaving.
        image_size: set by the toolkit from the encoder and passed on to parts that take it.
    """

    def __init__(
        self,
        parts: list[dict[str, Any]],
        weights: list[float] | None = None,
        size: int | None = None,
        seed: int = 0,
        image_size: int = 32,
    ):
        _check(parts, weights, "mixture")
        self.parts = [
            registry.build("dataset", part, f"mixture.parts[{i}]", image_size=image_size)
            for i, part in enumerate(parts)
        ]
        lengths = [len(p) for p in self.parts]
        weights = [float(w) for w in weights] if weights is not None else [float(n) for n in lengths]
        size = int(size) if size is not None else sum(lengths)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.weights, self.size, self.seed = weights, size, int(seed)
        self.counts = _counts(size, weights)
        owner = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(self.counts)])
        g = torch.Generator().manual_seed(self.seed)
        owner = owner[torch.randperm(size, generator=g)]  # [size]: which part fills each position
        local = torch.empty(size, dtype=torch.long)
        for k, n in enumerate(self.counts):
            where = (owner == k).nonzero().flatten()
            j = torch.arange(n)
            # repeat a short part, spread evenly over a long one
            local[where] = j % lengths[k] if n >= lengths[k] else (j * lengths[k]) // n
        self._owner, self._local = owner.tolist(), local.tolist()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        return self.parts[self._owner[index]][self._local[index]]

    # -- metadata the toolkit reads ------------------------------------------------------------------------

    @staticmethod
    def vocabulary(parts: list[dict[str, Any]]) -> list[str]:
        """The union of the parts' vocabularies (sorted), for the offline word-level tokenizer."""
        from toolkit.data.vocabulary import dataset_vocabulary

        _check(parts, None, "mixture")
        words: set[str] = set()
        for i, part in enumerate(parts):
            words.update(dataset_vocabulary(part, f"mixture.parts[{i}]"))
        return sorted(words)

    @classmethod
    def validate_config(cls, kwargs: Mapping[str, Any], where: str) -> None:
        """Config-time checks (nothing built): every part is a valid dataset node, weights match the parts."""
        parts = kwargs.get("parts")
        _check(parts, kwargs.get("weights"), where)
        for i, part in enumerate(parts):
            registry.validate("dataset", part, f"{where}.parts[{i}]", derived=("image_size",))
