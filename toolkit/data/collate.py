"""Encoding samples into token ids with image slots, and batching them.

Each ``<image>`` placeholder becomes ``image_tokens`` copies of the ``<image>`` token id, so the model writes
the connector's output into exactly those positions with one ``masked_scatter`` (as transformers' LLaVA
does): no Python loop over samples in the model, fixed positions that work with FSDP and generation alike.

The prompt template (``toolkit.data.template``, chosen with ``data.template``) writes the conversation and says
which tokens are targets: the assistant answers and their end-of-turn token. Labels equal the input ids there
and ``-100`` elsewhere (BOS, prompts, image slots, padding). They are NOT shifted: the model shifts them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from toolkit.data.markup import IMAGE
from toolkit.data.template import Encoded, build_template, check_markers, forbidden_markup, template_name
from toolkit.data.tokenizer import image_token_id
from toolkit.errors import ChimeraError
from toolkit.token_plan import LAYOUT_FIELDS

IGNORE_INDEX = -100
# A minimal conversation every template must be able to mask (checked when a collator is built).
_PROBE = {"id": "probe", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "."}]}


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
    image_tokens: int | Sequence[int],
    max_length: int,
    where: str = "",
    template: Any = None,
) -> dict[str, Any]:
    """Tokenize one sample with the prompt template, expanding each ``<image>`` into ``image_tokens`` slots.

    Args:
        sample: ``{"id": str, "images": [n, 3, H, W] or None, "conversations": [...]}`` (LLaVA format), and
            optionally ``"frames": [[i0, i1, ...], ...]``: which images are the frames of one video (the
            template's layout writes them as a video; ``toolkit.data.template``).
        tokenizer: a tokenizer from ``toolkit.data.load_tokenizer``.
        image_tokens: tokens one image produces after encoder, pooler and connector; or one count per image
            (the token plan's, ``toolkit.token_plan``: AnyRes images and frames differ), in placeholder order.
        max_length: longest sequence kept; text past it is cut, but never an image's token block.
        where: prefix naming the dataset in errors (e.g. ``"data.train"``).
        template: a built template, a ``data.template`` node or a name (None: ``vicuna_v1``); build it once
            with ``toolkit.data.template.build_template`` when encoding many samples.

    Returns:
        ``{"input_ids": LongTensor[T], "labels": LongTensor[T], "n_images": int, "truncated": bool}``

    The labels are checked: the tokens marked as targets must be exactly the tokens of the assistant answers
    (with their end-of-turn token) as the template wrote them; anything else is an error naming the sample.
    """
    sid = sample.get("id", "?") if isinstance(sample, Mapping) else "?"
    where = f"{where + ' ' if where else ''}sample '{sid}'"
    if not isinstance(sample, Mapping) or "conversations" not in sample:
        raise ChimeraError(
            f"{where}: expected a mapping with 'conversations' (and optionally 'id', 'images')"
        )
    if isinstance(image_tokens, Sequence):
        per_image = [int(n) for n in image_tokens]  # counted by the caller (the token plan)
        n_images = len(per_image)
    else:
        images = _images(sample, where)
        n_images = 0 if images is None else images.shape[0]
        per_image = [int(image_tokens)] * n_images
    if any(n < 1 for n in per_image) or (not isinstance(image_tokens, Sequence) and image_tokens < 1):
        raise ChimeraError(f"image_tokens must be >= 1, got {image_tokens}")

    template = build_template(template)
    frames = sample.get("frames")
    if frames is None or (isinstance(frames, Sequence) and len(frames) == 0):
        encoded = template.encode(sample["conversations"], tokenizer, where)
    elif "frames" not in inspect.signature(template.encode).parameters:
        raise ChimeraError(
            f"{where}: the sample has 'frames' (videos) but template '{template_name(template)}' takes no "
            "frames (its encode() has no 'frames' argument)"
        )
    else:
        encoded = template.encode(sample["conversations"], tokenizer, where, frames=frames)
    _check_targets(encoded, sample["conversations"], tokenizer, template, where)
    img_id = image_token_id(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    n_placeholders = 0
    for t, is_target in zip(encoded.ids, encoded.mask):
        if t == img_id:  # one placeholder -> that image's slots, never targets
            n = per_image[n_placeholders] if n_placeholders < n_images else 0
            n_placeholders += 1
            input_ids.extend([img_id] * n)
            labels.extend([IGNORE_INDEX] * n)
        else:
            input_ids.append(t)
            labels.append(t if is_target else IGNORE_INDEX)
    if n_placeholders != n_images:
        raise ChimeraError(
            f"{where}: {n_placeholders} '{IMAGE}' placeholders in the conversation but {n_images} images; "
            "each image needs exactly one placeholder in a human turn"
        )

    length = len(input_ids)
    truncated = length > max_length
    if truncated:
        last_image = length - 1 - input_ids[::-1].index(img_id) if n_images else -1
        if last_image >= max_length:
            raise ChimeraError(
                f"{where}: {length} tokens ({n_images} images, {sum(per_image)} image tokens) exceed "
                f"data.max_length={max_length} and truncating would cut through an image; "
                f"raise data.max_length to at least {length} (or use fewer tokens per image)"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "n_images": n_images,
        "truncated": truncated,
    }


def _check_targets(
    encoded: Encoded,
    conversations: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: Any,
    where: str,
) -> None:
    """The targets must be the assistant answers exactly: one target text per answer, holding that answer and
    nothing else but whitespace and special tokens (its end-of-turn), and as many marked tokens as those
    texts have on their own (a token straddling a prompt/answer boundary changes the count)."""
    name = template_name(template)
    answers = [turn["value"] for turn in conversations if turn["from"] == "gpt"]
    if len(encoded.mask) != len(encoded.ids):
        raise ChimeraError(
            f"{where}: template '{name}' returned {len(encoded.mask)} mask values for {len(encoded.ids)} tokens"
        )
    if len(encoded.targets) != len(answers):
        raise ChimeraError(
            f"{where}: template '{name}' marks {len(encoded.targets)} target span(s) but the conversation has "
            f"{len(answers)} 'gpt' answer(s); each answer must be one target span (for 'hf': one "
            "{% generation %} block per assistant message)"
        )
    specials = sorted(forbidden_markup(template, tokenizer), key=len, reverse=True)
    for k, (answer, target) in enumerate(zip(answers, encoded.targets)):
        answer = answer.strip()
        if answer not in target:
            raise ChimeraError(
                f"{where}: template '{name}': target span {k} is {target!r:.80}, which does not hold "
                f"answer {k} {answer!r:.80}"
            )
        rest = target.replace(answer, "", 1)
        for special in specials:
            rest = rest.replace(special, "")
        if rest.strip():
            raise ChimeraError(
                f"{where}: template '{name}': target span {k} is {target!r:.80}, which holds {rest.strip()!r:.40} "
                f"besides answer {k} and its end-of-turn token; only the answers are trained on"
            )
    marked = sum(encoded.mask)
    expected = (
        sum(map(len, tokenizer(encoded.targets, add_special_tokens=False)["input_ids"])) if answers else 0
    )
    if marked != expected:
        raise ChimeraError(
            f"{where}: template '{name}' marks {marked} target tokens but the assistant answers (with their "
            f"end-of-turn tokens) are {expected} tokens: {encoded.targets!r:.120}; the mask covers other "
            "tokens, or a token crosses the boundary between prompt and answer"
        )


class Collator:
    """Samples -> a right-padded batch for ``MultimodalModel``.

    Args:
        tokenizer: from ``toolkit.data.load_tokenizer``.
        image_tokens: slots reserved per ``<image>``; max_length: see ``encode``.
        where: names the dataset in errors (``"data.train"``).
        template: the prompt template (a built one, a ``data.template`` node or a name; None: ``vicuna_v1``).
        vision: the vision data path (``toolkit.data.vision.VisionProcessor``): every image of every dataset
            is preprocessed, tiled and counted by it, here in the loader's workers. None: images must already
            be ``[n, 3, H, W]`` tensors of one size, ``image_tokens`` each.

    Returns:
        ``input_ids``: LongTensor[B, T] (right-padded with the pad id);
        ``labels``: LongTensor[B, T] (``-100`` on prompts, image slots and padding; not shifted);
        ``attention_mask``: LongTensor[B, T] (1 on real tokens);
        ``images``: FloatTensor[N, 3, H, W], all images of the batch in placeholder order, or None if none
        (with ``vision``: all VIEWS, an AnyRes image giving its global view then its tiles);
        ``image_layout``: LongTensor[n_images, 6] (with ``vision`` only): one token-plan row per image,
        ``(views, rows, cols, width, height, frame)``, which the model lays the features out by;
        ``n_over_budget``: LongTensor[], samples the ``data.over_budget`` policy reduced (``data/over_budget``);
        ``n_truncated``: LongTensor[], how many samples of the batch were cut at ``max_length`` (summed over
        batches, it is the ``data/truncated`` count; it travels in the batch because collation runs in the
        loader's worker processes);
        ``n_skipped``: LongTensor[], how many samples replace a bad record (a dataset under
        ``on_bad_sample: skip`` marks them ``"skipped": 1``): the ``data/skipped`` count.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_tokens: int,
        max_length: int,
        where: str = "",
        template: Any = None,
        vision: Any = None,
    ):
        if tokenizer.pad_token_id is None:
            raise ChimeraError("tokenizer has no pad token; build it with toolkit.data.load_tokenizer")
        image_token_id(tokenizer)  # fail now, not in a worker
        self.tokenizer = tokenizer
        self.image_tokens = int(image_tokens)
        self.max_length = int(max_length)
        self.where = where
        self.template = build_template(template)
        self.vision = vision
        check_markers(self.template, tokenizer)  # a layout marker the tokenizer would split into text
        # fail now, not in a worker: a template that cannot mask a minimal conversation with this tokenizer
        encode(
            _PROBE,
            tokenizer,
            1,
            1 << 30,
            f"data.template '{template_name(self.template)}' on a minimal",
            self.template,
        )

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if self.vision is not None:
            return self._collate_vision(samples)
        encoded = [
            encode(s, self.tokenizer, self.image_tokens, self.max_length, self.where, self.template)
            for s in samples
        ]
        batch = self._pad(encoded, samples)
        batch["images"] = self._images(samples)
        return batch

    def _collate_vision(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Every sample through the vision path (views, token plan, budget), then tokenised with its counts."""
        prefix = f"{self.where} " if self.where else ""
        done = [self.vision(s, f"{prefix}sample '{s.get('id', '?')}'") for s in samples]
        encoded = [
            encode(p.sample, self.tokenizer, p.tokens, self.max_length, self.where, self.template)
            for p in done
        ]
        batch = self._pad(encoded, samples)
        views = [p.views for p in done if p.views is not None]
        rows = [r for p in done for r in p.rows]
        batch["images"] = torch.cat(views) if views else None
        batch["image_layout"] = (
            torch.tensor(rows, dtype=torch.long).reshape(-1, LAYOUT_FIELDS) if rows else None
        )
        batch["n_over_budget"] = torch.tensor(sum(p.over_budget for p in done), dtype=torch.long)
        return batch

    def _pad(self, encoded: list[dict[str, Any]], samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
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
            "n_truncated": torch.tensor(sum(e["truncated"] for e in encoded), dtype=torch.long),
            "n_skipped": torch.tensor(sum(int(s.get("skipped", 0)) for s in samples), dtype=torch.long),
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
