"""The vision data path, run in the data workers: a sample's images -> encoder-sized views + the token plan.

One ``VisionProcessor`` per loader (the collator holds it) serves every dataset: real images (Pillow, any
size), synthetic tensors and video frames all go through the same steps:

1. **plan**: each image gets its layout row from its size and the model's ``TokenPlan`` (an AnyRes grid by
   LLaVA-NeXT's rule, or one view; video frames are always one view), hence its token count;
2. **budget**: when the sample's image tokens exceed ``data.max_image_tokens``, the declared
   ``data.over_budget`` policy applies: ``error`` (a message naming the sample), ``fewer_tiles`` (AnyRes
   images get grids of fewer tiles, down to their global view alone), or ``fewer_frames`` (each video keeps
   fewer frames, sampled uniformly again; the conversation loses their placeholders). A reduced sample is
   counted (``n_over_budget`` in the batch, ``data/over_budget`` in the logs);
3. **pixels**: one view per plain image or frame, the encoder's own preprocessing (``data.preprocess``:
   ``resize``, ``center_crop`` or ``pad``, from its timm data config; ``components/encoders/preprocess.py``),
   or the global view plus the tiles of an AnyRes image (``components/encoders/anyres.py``).

Mean/std normalisation is not done here: each encoder normalises inside its forward with its own data
config's mean/std (a fused encoder's towers differ), so views stay floats in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from toolkit.data.markup import IMAGE
from toolkit.errors import ChimeraError
from toolkit.token_plan import LAYOUT_FIELDS, TokenPlan

PREPROCESS_MODES = ("resize", "center_crop", "pad")
OVER_BUDGET = ("error", "fewer_frames", "fewer_tiles")


def uniform_indices(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices spread uniformly over ``range(n)``, first and last kept
    (``np.linspace(0, n - 1, k)`` rounded, as LLaVA-NeXT-Video samples frames)."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return [int(i) for i in np.round(np.linspace(0, n - 1, k)).astype(int)]


@dataclass
class Processed:
    """One sample after the vision path: the (possibly reduced) sample, its views and its plan."""

    sample: Mapping[str, Any]
    views: torch.Tensor | None  # [V, 3, S, S]
    rows: list[list[int]]  # layout row per image (toolkit.token_plan)
    tokens: list[int]  # decoder positions per image
    over_budget: bool  # the budget policy reduced this sample


class VisionProcessor:
    """A sample's images -> views, layout rows and token counts (see the module docstring).

    Args:
        plan: the model's ``TokenPlan`` (``model.token_plan``).
        data_config: the encoder's timm data config (``input_size``, ``interpolation``, ``mean``,
            ``crop_pct``).
        preprocess: ``resize`` | ``center_crop`` | ``pad`` for plain images and frames.
        max_image_tokens: cap on the image tokens of one sample; None: no cap.
        over_budget: ``error`` | ``fewer_frames`` | ``fewer_tiles``.
    """

    def __init__(
        self,
        plan: TokenPlan,
        data_config: Mapping[str, Any],
        preprocess: str = "resize",
        max_image_tokens: int | None = None,
        over_budget: str = "error",
    ) -> None:
        if preprocess not in PREPROCESS_MODES:
            raise ChimeraError(
                f"data.preprocess: '{preprocess}' is not one of {', '.join(PREPROCESS_MODES)}",
                key="data.preprocess",
            )
        if over_budget not in OVER_BUDGET:
            raise ChimeraError(
                f"data.over_budget: '{over_budget}' is not one of {', '.join(OVER_BUDGET)}",
                key="data.over_budget",
            )
        if max_image_tokens is not None and int(max_image_tokens) < 1:
            raise ChimeraError(
                f"data.max_image_tokens: expected an integer >= 1 or null, got {max_image_tokens}",
                key="data.max_image_tokens",
            )
        size = tuple(int(s) for s in data_config["input_size"][-2:])
        if size != (plan.image_size, plan.image_size):
            raise ChimeraError(
                f"encoder data config input_size {size} is not the plan's {plan.image_size} px"
            )
        self.plan = plan
        self.data_config = dict(data_config)
        self.preprocess = preprocess
        self.max_image_tokens = None if max_image_tokens is None else int(max_image_tokens)
        self.over_budget = over_budget
        self._transform: Any = None

    @classmethod
    def plain(cls, image_size: int, image_tokens: int) -> VisionProcessor:
        """A processor for a model known only by its input side and tokens per image: one view per image,
        bicubic ``resize`` (what a loader without a model uses, e.g. a datamodule built by hand)."""
        size = int(image_size)
        plan = TokenPlan(size, int(image_tokens), None)
        return cls(plan, {"input_size": (3, size, size), "interpolation": "bicubic", "mean": (0.0, 0.0, 0.0)})

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_transform"] = None  # a closure; rebuilt in the worker
        return state

    @property
    def transform(self) -> Any:
        if self._transform is None:
            from components.encoders.preprocess import make_transform  # a pure helper, no component

            self._transform = make_transform(self.data_config, self.preprocess)
        return self._transform

    # -- the three steps -------------------------------------------------------------------------------------

    def __call__(self, sample: Mapping[str, Any], where: str) -> Processed:
        images = sample_images(sample, where)
        if not images:
            return Processed(sample, None, [], [], False)
        frames = frame_indices(sample)
        grids = [None if i in frames else self.plan.grid_for(*_size(im)) for i, im in enumerate(images)]
        rows = [self.plan.row(*_size(im), g, i in frames) for i, (im, g) in enumerate(zip(images, grids))]
        tokens = [self.plan.tokens(r) for r in rows]
        over = self.max_image_tokens is not None and sum(tokens) > self.max_image_tokens
        if over:
            sample, images, rows = self._fit(sample, images, rows, frames, where)
            tokens = [self.plan.tokens(r) for r in rows]
        views = torch.cat([self._views(im, r) for im, r in zip(images, rows)])  # [V, 3, S, S]
        return Processed(sample, views, rows, tokens, over)

    def images(
        self, images: Sequence[Any], frames: Sequence[Sequence[int]] = ()
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int]]:
        """For callers outside a loader (generation, evaluation): images -> ``(views [V, 3, S, S],
        image_layout [N, 6], tokens per image)``, as the collator builds them (the budget applies too)."""
        sample = {
            "id": "inference",
            "images": list(images),
            "frames": [list(g) for g in frames],
            "conversations": [],
        }
        done = self(sample, "images")
        layout = torch.tensor(done.rows, dtype=torch.long).reshape(-1, LAYOUT_FIELDS) if done.rows else None
        return done.views, layout, done.tokens

    def _views(self, image: Any, row: list[int]) -> torch.Tensor:
        """``[views, 3, S, S]`` of one image: its preprocessed self, or the global view then the tiles."""
        if row[1] == 0:
            return self.transform(image)[None]
        from PIL import Image
        from torchvision.transforms.functional import to_tensor

        from components.encoders.anyres import split_tiles
        from components.encoders.preprocess import to_pil

        pil = to_pil(image) if isinstance(image, torch.Tensor) else image.convert("RGB")
        tiles, global_view = split_tiles(
            pil, (row[1], row[2]), self.plan.image_size, resample=Image.Resampling.BICUBIC
        )
        return torch.stack([to_tensor(v) for v in [global_view, *tiles]])

    def _fit(
        self,
        sample: Mapping[str, Any],
        images: list[Any],
        rows: list[list[int]],
        frames: set[int],
        where: str,
    ) -> tuple[Mapping[str, Any], list[Any], list[list[int]]]:
        budget = self.max_image_tokens
        total = sum(self.plan.tokens(r) for r in rows)
        if self.over_budget == "fewer_tiles":
            tiled = [i for i, r in enumerate(rows) if r[1] > 0]
            caps = sorted({r[1] * r[2] for r in rows if r[1] > 0}, reverse=True)
            for cap in [*range(caps[0] - 1, 0, -1), 0] if caps else []:
                trial = [list(r) for r in rows]
                for i in tiled:
                    w, h = _size(images[i])
                    trial[i] = self.plan.row(w, h, self.plan.grid_for(w, h, cap) if cap else None)
                if sum(self.plan.tokens(r) for r in trial) <= budget:
                    return sample, images, trial
            raise self._error(where, total, "even with every AnyRes image reduced to its global view")
        if self.over_budget == "fewer_frames":
            videos = [list(g) for g in sample.get("frames") or []]
            if videos:
                fixed = sum(self.plan.tokens(r) for i, r in enumerate(rows) if i not in frames)
                per_frame = self.plan.frame_tokens
                allowed = (budget - fixed) // per_frame
                n_frames = sum(map(len, videos))
                if allowed >= len(videos):
                    ks = [max(1, len(g) * allowed // n_frames) for g in videos]  # shares of the frames left
                    while sum(ks) > allowed:  # a 1-frame floor may overshoot: take from the longest
                        ks[ks.index(max(ks))] -= 1
                    keep = set(range(len(images))) - frames
                    for group, k in zip(videos, ks):
                        keep.update(group[j] for j in uniform_indices(len(group), k))
                    return _keep_images(sample, images, rows, sorted(keep))
            raise self._error(
                where, total, "with one frame per video" if videos else "(the sample has no video)"
            )
        raise self._error(where, total, "")

    def _error(self, where: str, total: int, tried: str) -> ChimeraError:
        policy = f"data.over_budget: {self.over_budget}"
        what = f"; {policy} cannot fit it {tried}" if tried else f" ({policy})"
        return ChimeraError(
            f"{where}: {total} image tokens exceed data.max_image_tokens={self.max_image_tokens}{what}; raise the "
            "cap, use fewer tokens per image (pooler), or choose another data.over_budget policy",
            key="data.max_image_tokens",
        )


def sample_images(sample: Mapping[str, Any], where: str) -> list[Any]:
    """A sample's images as a list (Pillow images or ``[3, h, w]`` float tensors); [] when none."""
    images = sample.get("images")
    if images is None:
        return []
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ChimeraError(
                f"{where}: 'images' must be float tensors [n_images, 3, H, W] in [0, 1] or a list of images, "
                f"got {tuple(images.shape)} {images.dtype}"
            )
        return list(images)
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise ChimeraError(f"{where}: 'images' must be a list of images, got {type(images).__name__}")
    for k, im in enumerate(images):
        if isinstance(im, torch.Tensor):
            if im.ndim != 3 or im.shape[0] != 3 or not im.is_floating_point():
                raise ChimeraError(
                    f"{where}: image {k} must be a float tensor [3, H, W] in [0, 1], got {tuple(im.shape)} {im.dtype}"
                )
        elif not hasattr(im, "size") or not hasattr(im, "convert"):
            raise ChimeraError(f"{where}: image {k} is a {type(im).__name__}, not a Pillow image or a tensor")
    return list(images)


def frame_indices(sample: Mapping[str, Any]) -> set[int]:
    """Indices of the sample's images that are video frames (its ``frames`` groups)."""
    return {int(i) for group in sample.get("frames") or [] for i in group}


def _size(image: Any) -> tuple[int, int]:
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size


def _keep_images(
    sample: Mapping[str, Any], images: list[Any], rows: list[list[int]], keep: list[int]
) -> tuple[dict[str, Any], list[Any], list[list[int]]]:
    """The sample with only the images ``keep`` (sorted indices): placeholders of the others removed from the
    human turns (with the whitespace that separated them from the next frame), ``frames`` re-indexed."""
    kept, new_index = set(keep), {old: new for new, old in enumerate(keep)}
    k, turns = 0, []
    for turn in sample["conversations"]:
        if turn["from"] != "human" or IMAGE not in turn["value"]:
            turns.append(dict(turn))
            continue
        pieces = turn["value"].split(IMAGE)
        out = [pieces[0]]
        for text in pieces[1:]:
            if k in kept:
                out += [IMAGE, text]
            elif text.strip():  # the dropped frame's separator goes with it; real text stays
                out[-1] += text
            k += 1
        turns.append({**turn, "value": "".join(out)})
    frames = [[new_index[i] for i in group if i in kept] for group in sample.get("frames") or []]
    reduced = {**sample, "conversations": turns, "frames": [g for g in frames if g]}
    reduced["images"] = [images[i] for i in keep]
    return reduced, [images[i] for i in keep], [rows[i] for i in keep]
