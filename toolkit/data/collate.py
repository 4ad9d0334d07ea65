"""Encoding samples into token ids with image slots, and batching them.

Each ``<image>`` placeholder becomes ``image_tokens`` copies of the ``<image>`` token id, so the model writes
the connector's output into exactly those positions with one ``masked_scatter`` (as transformers' LLaVA
does): no Python loop over samples in the model, fixed positions that work with FSDP and generation alike.

Labels equal the input ids on target segments (assistant answers and their ``</s>``) and ``-100`` elsewhere
(BOS, prompts, image slots, padding). They are NOT shifted: the model shifts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from toolkit.data.conversation import render
from toolkit.data.tokenizer import IMAGE, image_token_id
from toolkit.errors import ChimeraError

IGNORE_INDEX = -100


def _images(sample: Mapping[str, Any], where: str) -> torch.Tensor | None:
    """The sample's images as ``[n, 3, H, W]`` (None when it has none)."""
    images = sample.get("images")
    if images is None:
        return None
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            return None
        images = torch.stack(list(images))
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ChimeraError(f"{where}: 'images' must be a float tensor [n_images, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise ChimeraError(f"{where}: 'images' must be floats in [0, 1], got dtype {images.dtype}")
    return images if images.shape[0] > 0 else None


def encode(
    sample: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    image_tokens: int,
    max_length: int,
    where: str = "",
) -> dict[str, Any]:
    """Tokenize one sample, expanding each ``<image>`` into ``image_tokens`` image-token slots.

    Args:
        sample: ``{"id": str, "images": [n, 3, H, W] or None, "conversations": [...]}`` (LLaVA format).
        tokenizer: a tokenizer from ``toolkit.data.load_tokenizer``.
        image_tokens: tokens one image produces after encoder, pooler and connector.
        max_length: longest sequence kept; text past it is cut, but never an image's token block.
        where: prefix naming the dataset in errors (e.g. ``"data.train"``).

    Returns:
        ``{"input_ids": LongTensor[T], "labels": LongTensor[T], "n_images": int}``
    """
    if image_tokens < 1:
        raise ChimeraError(f"image_tokens must be >= 1, got {image_tokens}")
    sid = sample.get("id", "?") if isinstance(sample, Mapping) else "?"
    where = f"{where + ' ' if where else ''}sample '{sid}'"
    if not isinstance(sample, Mapping) or "conversations" not in sample:
        raise ChimeraError(
            f"{where}: expected a mapping with 'conversations' (and optionally 'id', 'images')"
        )
    images = _images(sample, where)
    n_images = 0 if images is None else images.shape[0]

    segments = render(sample["conversations"], where, bos=tokenizer.bos_token, eos=tokenizer.eos_token)
    img_id = image_token_id(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    n_placeholders = 0
    for text, is_target in segments:
        for t in tokenizer.encode(text, add_special_tokens=False):
            if t == img_id:  # one placeholder -> image_tokens slots, never targets
                n_placeholders += 1
                input_ids.extend([img_id] * image_tokens)
                labels.extend([IGNORE_INDEX] * image_tokens)
            else:
                input_ids.append(t)
                labels.append(t if is_target else IGNORE_INDEX)
    if n_placeholders != n_images:
        raise ChimeraError(
            f"{where}: {n_placeholders} '{IMAGE}' placeholders in the conversation but {n_images} images; "
            "each image needs exactly one placeholder in a human turn"
        )

    length = len(input_ids)
    if length > max_length:
        last_image = length - 1 - input_ids[::-1].index(img_id) if n_images else -1
        if last_image >= max_length:
            raise ChimeraError(
                f"{where}: {length} tokens ({n_images} images x {image_tokens} tokens) exceed "
                f"data.max_length={max_length} and truncating would cut through an image; "
                f"raise data.max_length to at least {length} (or use fewer tokens per image)"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "n_images": n_images,
    }


class Collator:
    """Samples -> a right-padded batch for ``MultimodalModel``.

    Returns:
        ``input_ids``: LongTensor[B, T] (right-padded with the pad id);
        ``labels``: LongTensor[B, T] (``-100`` on prompts, image slots and padding; not shifted);
        ``attention_mask``: LongTensor[B, T] (1 on real tokens);
        ``images``: FloatTensor[N, 3, H, W], all images of the batch in placeholder order, or None if none;
        ``n_target_tokens``: LongTensor[] = ``(labels[:, 1:] != -100).sum()``, the tokens the shifted loss
        averages over (lets a step weight its loss by token count across ranks or accumulation steps).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, image_tokens: int, max_length: int, where: str = ""
    ):
        if tokenizer.pad_token_id is None:
            raise ChimeraError("tokenizer has no pad token; build it with toolkit.data.load_tokenizer")
        image_token_id(tokenizer)  # fail now, not in a worker
        self.tokenizer = tokenizer
        self.image_tokens = int(image_tokens)
        self.max_length = int(max_length)
        self.where = where

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        encoded = [encode(s, self.tokenizer, self.image_tokens, self.max_length, self.where) for s in samples]
        B, T = len(encoded), max(e["input_ids"].shape[0] for e in encoded)
        input_ids = torch.full((B, T), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = e["input_ids"].shape[0]
            input_ids[i, :n] = e["input_ids"]
            labels[i, :n] = e["labels"]
            attention_mask[i, :n] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "images": self._images(samples),
            "n_target_tokens": (labels[:, 1:] != IGNORE_INDEX).sum(),
        }

    def _images(self, samples: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
        prefix = f"{self.where} " if self.where else ""
        found = [
            (s.get("id", "?"), im)
            for s in samples
            if (im := _images(s, f"{prefix}sample '{s.get('id', '?')}'")) is not None
        ]
        if not found:
            return None
        sizes = {tuple(im.shape[1:]) for _, im in found}
        if len(sizes) > 1:
            listing = ", ".join(f"'{sid}' {tuple(im.shape[1:])}" for sid, im in found)
            raise ChimeraError(f"{prefix}images of one batch must share one size [3, H, W]; got {listing}")
        return torch.cat([im for _, im in found])
