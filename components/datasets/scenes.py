"""``scenes``: a synthetic long-context suite of multi-object scenes, deterministic, generated on the fly.

Every image is a scene: 1 to 6 coloured shapes (the palette and shapes of ``synthetic_shapes``) of varied
size, anywhere on a grey background with light noise, never overlapping (objects that do not fit shrink), and
no colour twice in a scene (so a colour names an object). One task per dataset; answers are single words or
short word sequences.

Single-image tasks (``images_per_sample = 1``):

- ``caption``:       ``describe the image .`` -> ``a red circle and a blue square`` (stage-1 alignment; the
  objects are listed in palette order, so the caption is a function of the image).
- ``position``:      ``where is the red circle ?`` -> one of 9 regions of a 3 x 3 grid (``top left``, ``top``,
  ..., ``center``, ..., ``bottom right``), decided by the object's centre, which lies well inside its cell.
- ``spatial``:       ``where is the red circle relative to the blue square ?`` -> ``left`` | ``right`` |
  ``above`` | ``below``. The separation along the answer's axis is at least twice the offset across it, and
  the objects' boxes are disjoint along it. Needs the 2D layout: 1D pooling (LongLLaVA's ablation) merges
  horizontal neighbours, 2D pooling keeps both axes at half resolution.
- ``count_objects``: ``how many shapes are there ?`` -> ``1`` ... ``6``.

Multi-image tasks (``images_per_sample = N`` in 2..1000, one ``<image>`` placeholder per image), after
VNBench (arXiv 2406.09367), V-NIAH (LongVA, arXiv 2406.16852) and MileBench (arXiv 2404.18532). The asked
colour(s) appear only in the target image(s), with the named shape; the other images are distractor scenes:

- ``retrieval``: ``which image shows the red circle ?`` -> ``7`` (1-based image number, one word).
- ``ordering``:  ``in which order do the red circle , the green cross and the blue square appear ?`` ->
  ``green cross then red circle then blue square`` (``min(N, 3)`` items, named in palette order in the
  question, each in one image).
- ``counting``:  ``how many images show the red circle ?`` -> ``1`` ... ``min(N, 4)``.
- ``needle``:    ``which shape is red ?`` -> ``circle``: one needle image at a uniform depth in a haystack of
  N - 1 scenes without that colour (V-NIAH asks about the needle's content, not its place).

``chance`` is the exact-match accuracy of the best guess made from the question alone (without the images).
The question never says anything about its answer (the objects it names are drawn independently of where and
how often they appear), and every answer is uniform over its answer set by construction, so ``chance`` is
1 / (number of answers): the best constant answer, or for ``ordering`` the best constant order of the named
items. For ``caption`` it is the probability of the most likely caption. ``vocabulary()`` lists every word
the generator writes (it is fixed: numbers 1..1000 are single words whatever N is, so one tokenizer serves
every task and stage).

Determinism: sample ``index`` draws its layout from ``random.Random`` (only ``random()`` is used, whose stream
Python guarantees across versions) and its pixels from a ``torch.Generator``, both seeded from ``(seed, split,
task, index)``. Pixels are quantised to multiples of 1/255, so a PNG export (``toolkit.data.export``) reads
back bit for bit. Drawing is vectorised: one mask computation per shape for all objects of all images of a
sample, then ``index_add_`` into the canvases (no Python loop over pixels).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from components.datasets.synthetic_shapes import COLORS, SHAPES, shape_mask
from toolkit.data.markup import IMAGE as _IMAGE  # the placeholder the collator expands
from toolkit.errors import ChimeraError, did_you_mean
from toolkit.registry import register

SINGLE_IMAGE_TASKS = ("caption", "position", "spatial", "count_objects")
MULTI_IMAGE_TASKS = ("retrieval", "ordering", "counting", "needle")
TASKS = SINGLE_IMAGE_TASKS + MULTI_IMAGE_TASKS

REGIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)  # row-major 3 x 3 grid
DIRECTIONS = ("left", "right", "above", "below")  # where the first object is, relative to the second
MAX_IMAGES = 1000
MAX_OBJECTS = len(COLORS)  # one colour per object in a scene
MAX_COUNT = 4  # counting answers 1..min(N, MAX_COUNT)
ORDER_ITEMS = 3  # ordering asks for min(N, ORDER_ITEMS) objects

_QUESTIONS = {
    "caption": "describe the image .",
    "position": "where is the {obj} ?",
    "spatial": "where is the {obj} relative to the {ref} ?",
    "count_objects": "how many shapes are there ?",
    "retrieval": "which image shows the {obj} ?",
    "ordering": "in which order do {objs} appear ?",
    "counting": "how many images show the {obj} ?",
    "needle": "which shape is {color} ?",
}
_JOINERS = ("a", "an", "and", "the", ",", "then")  # words of captions, item lists and ordering answers

# Geometry, as fractions of the image side.
_OBJECTS = (1, 3)  # objects per image, [min, max]
_RADIUS = (0.1, 0.2)  # half extent of a shape (every shape lies inside its [c - r, c + r] box)
_MAX_RADIUS = 0.25
_GAP = 0.02  # free space between two objects' boxes
_CELL_MARGIN = 0.04  # a ``position`` target's centre keeps this far from its cell's borders
_TRIES = 64  # placements tried before an object is shrunk (x 0.85) and tried again
# Pixels (as synthetic_shapes).
_BACKGROUND = (0.35, 0.65)
_COLOR_JITTER = 0.05
_NOISE_STD = 0.03

_COLOR_NAMES = tuple(COLORS)
_PALETTE = torch.tensor(list(COLORS.values()))  # [6, 3]


@dataclass(frozen=True)
class Obj:
    """One drawn object: centre (cx, cy) and half extent r as fractions of the side; y grows downwards."""

    color: str
    shape: str
    cx: float
    cy: float
    r: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Layout:
    """What a sample shows and asks: the objects of each image, the question and the answer."""

    images: tuple[tuple[Obj, ...], ...]
    question: str
    answer: str


class _Rng:
    """Draws from ``random.Random.random()`` only: Python keeps that stream stable across versions (unlike
    ``randrange``, ``sample`` or ``shuffle``)."""

    def __init__(self, seed: int):
        self._random = random.Random(seed).random

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self._random()

    def randint(self, n: int) -> int:
        """Uniform in 0..n-1."""
        return min(int(self._random() * n), n - 1)

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.randint(len(seq))]

    def sample(self, seq: Sequence[Any], k: int) -> list[Any]:
        """``k`` distinct items in random order (partial Fisher-Yates)."""
        pool = list(seq)
        for i in range(k):
            j = i + self.randint(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _seeds(seed: int, split: str, task: str, index: int) -> tuple[int, int]:
    """(layout seed, pixel seed) of one sample."""
    digest = hashlib.blake2b(f"scenes/{seed}/{split}/{task}/{index}".encode(), digest_size=16).digest()
    mask = (1 << 63) - 1
    return int.from_bytes(digest[:8], "little") & mask, int.from_bytes(digest[8:], "little") & mask


def _reserved_colors(task: str, images_per_sample: int) -> int:
    """Colours a multi-image task keeps out of its distractor scenes."""
    if task == "ordering":
        return min(images_per_sample, ORDER_ITEMS)
    return 1 if task in MULTI_IMAGE_TASKS else 0


def _object_range(task: str, objects: Sequence[int]) -> tuple[int, int]:
    """Objects per image the task draws from (``spatial`` needs two)."""
    lo, hi = int(objects[0]), int(objects[1])
    return (max(lo, 2), max(hi, 2)) if task == "spatial" else (lo, hi)


def check_args(
    task: str, images_per_sample: int, objects: Sequence[int], radius: Sequence[float]
) -> tuple[str, int, tuple[int, int], tuple[float, float]]:
    """Validated, normalised (task, images_per_sample, objects, radius); ``ValueError`` names the bad one."""
    task = str(task)
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'{did_you_mean(task, TASKS)}; tasks: {', '.join(TASKS)}")
    n = int(images_per_sample)
    if task in SINGLE_IMAGE_TASKS and n != 1:
        raise ValueError(f"task '{task}' is single-image: images_per_sample must be 1, got {n}")
    if task in MULTI_IMAGE_TASKS and not 2 <= n <= MAX_IMAGES:
        raise ValueError(f"task '{task}' needs images_per_sample in 2..{MAX_IMAGES}, got {n}")
    objects = tuple(int(k) for k in objects)
    if len(objects) != 2 or not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be [min, max] with 1 <= min <= max, got {list(objects)}")
    limit = MAX_OBJECTS - _reserved_colors(task, n)
    if _object_range(task, objects)[1] > limit:
        raise ValueError(
            f"objects: task '{task}' with {n} image(s) allows at most {limit} objects per image (one colour "
            f"each, {MAX_OBJECTS - limit} kept for the question), got max {objects[1]}"
        )
    radius = tuple(float(r) for r in radius)
    if len(radius) != 2 or not 0.02 <= radius[0] <= radius[1] <= _MAX_RADIUS:
        raise ValueError(
            f"radius must be [min, max] with 0.02 <= min <= max <= {_MAX_RADIUS}, got {list(radius)}"
        )
    return task, n, objects, radius


@register("dataset", "scenes")
class Scenes(Dataset):
    """Multi-object scenes: captions, spatial questions, and multi-image tasks over up to 1000 images.

    Single-image tasks: caption, position, spatial, count_objects; multi-image tasks: retrieval, ordering,
    counting, needle. Deterministic, no download (see the module docstring).

    Args:
        task: one of ``caption``, ``position``, ``spatial``, ``count_objects`` (single image) or
            ``retrieval``, ``ordering``, ``counting``, ``needle`` (multi-image); mix tasks with ``mixture``.
        images_per_sample: 1 for the single-image tasks, N in 2..1000 for the multi-image ones.
        size: number of samples.
        split: mixed into every sample's seed so that ``train`` and ``val`` differ.
        seed: base seed; with ``split``, ``task`` and the index it fixes every sample.
        objects: [min, max] objects per image, drawn uniformly (``spatial`` uses at least 2).
        radius: [min, max] half extent of an object, as a fraction of the image side (objects that do not fit
            are shrunk until they do).
        image_size: side of the square images (set by the toolkit from the encoder).
    """

    def __init__(
        self,
        task: str = "spatial",
        images_per_sample: int = 1,
        size: int = 2000,
        split: str = "train",
        seed: int = 0,
        objects: tuple[int, int] = _OBJECTS,
        radius: tuple[float, float] = _RADIUS,
        image_size: int = 32,
    ):
        self.task, self.images_per_sample, self.objects, self.radius = check_args(
            task, images_per_sample, objects, radius
        )
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        self.size, self.split, self.seed, self.image_size = int(size), str(split), int(seed), int(image_size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"id", "images": FloatTensor[N, 3, S, S] in [0, 1] (multiples of 1/255), "conversations"}``."""
        layout = self.layout(index)
        _, pixel_seed = _seeds(self.seed, self.split, self.task, index)
        images = self._render(layout.images, torch.Generator().manual_seed(pixel_seed))
        placeholders = " ".join([_IMAGE] * len(layout.images))
        return {
            "id": f"scenes-{self.task}-{self.split}-{self.seed}-{index}",
            "images": images,
            "conversations": [
                {"from": "human", "value": f"{placeholders}\n{layout.question}"},
                {"from": "gpt", "value": layout.answer},
            ],
        }

    def layout(self, index: int) -> Layout:
        """The objects, question and answer of sample ``index`` (what ``__getitem__`` draws)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = _Rng(_seeds(self.seed, self.split, self.task, index)[0])
        return getattr(self, f"_{self.task}")(rng)

    # -- single-image tasks ------------------------------------------------------------------------------

    def _caption(self, rng: _Rng) -> Layout:
        scene = self._scene(rng, _COLOR_NAMES)
        ordered = sorted(scene, key=lambda o: _COLOR_NAMES.index(o.color))
        caption = " and ".join(f"{_article(o.color)} {o.name}" for o in ordered)
        return Layout((scene,), _QUESTIONS["caption"], caption)

    def _position(self, rng: _Rng) -> Layout:
        cell = rng.randint(len(REGIONS))
        row, col = divmod(cell, 3)
        r = rng.uniform(*self.radius)
        cx = rng.uniform(max(col / 3 + _CELL_MARGIN, r), min((col + 1) / 3 - _CELL_MARGIN, 1 - r))
        cy = rng.uniform(max(row / 3 + _CELL_MARGIN, r), min((row + 1) / 3 - _CELL_MARGIN, 1 - r))
        target = Obj(rng.choice(_COLOR_NAMES), rng.choice(SHAPES), cx, cy, r)
        scene = self._scene(rng, _COLOR_NAMES, fixed=[target])
        return Layout((scene,), _QUESTIONS["position"].format(obj=target.name), REGIONS[cell])

    def _spatial(self, rng: _Rng) -> Layout:
        direction = rng.randint(len(DIRECTIONS))
        color_a, color_b = rng.sample(_COLOR_NAMES, 2)
        (ax, ay, ra), (bx, by, rb) = self._pair(rng, direction)
        obj_a = Obj(color_a, rng.choice(SHAPES), ax, ay, ra)
        obj_b = Obj(color_b, rng.choice(SHAPES), bx, by, rb)
        scene = self._scene(rng, _COLOR_NAMES, fixed=[obj_a, obj_b])
        question = _QUESTIONS["spatial"].format(obj=obj_a.name, ref=obj_b.name)
        return Layout((scene,), question, DIRECTIONS[direction])

    def _pair(self, rng: _Rng, direction: int) -> tuple[tuple[float, float, float], ...]:
        """(x, y, r) of objects a and b, a lying in ``DIRECTIONS[direction]`` of b: the offset along that
        axis is at least twice the offset across it and keeps the boxes apart (rejection sampling; both
        objects shrink when the room is too tight)."""
        axis, positive = divmod(direction, 2)  # axis 0: x (left/right), 1: y (above/below)
        sign = 1 if positive else -1
        ra, rb = rng.uniform(*self.radius), rng.uniform(*self.radius)
        for _ in range(40):
            for _ in range(4 * _TRIES):
                a = (rng.uniform(ra, 1 - ra), rng.uniform(ra, 1 - ra))
                b = (rng.uniform(rb, 1 - rb), rng.uniform(rb, 1 - rb))
                along = sign * (a[axis] - b[axis])
                if along >= max(2 * abs(a[1 - axis] - b[1 - axis]), ra + rb + _GAP):
                    return (*a, ra), (*b, rb)
            ra, rb = 0.85 * ra, 0.85 * rb
        raise AssertionError("unreachable: two objects of radius <= 0.25 * 0.85^39 always fit")

    def _count_objects(self, rng: _Rng) -> Layout:
        scene = self._scene(rng, _COLOR_NAMES)
        return Layout((scene,), _QUESTIONS["count_objects"], str(len(scene)))

    # -- multi-image tasks -------------------------------------------------------------------------------

    def _haystack(self, rng: _Rng, targets: Mapping[int, tuple[str, str]], reserved: Sequence[str]) -> tuple:
        """N scenes without the ``reserved`` colours, except image i, which shows ``targets[i]``."""
        pool = [c for c in _COLOR_NAMES if c not in reserved]
        return tuple(
            self._scene(rng, pool, wanted=[targets[i]] if i in targets else [])
            for i in range(self.images_per_sample)
        )

    def _retrieval(self, rng: _Rng) -> Layout:
        target = (rng.choice(_COLOR_NAMES), rng.choice(SHAPES))
        where = rng.randint(self.images_per_sample)
        images = self._haystack(rng, {where: target}, [target[0]])
        return Layout(images, _QUESTIONS["retrieval"].format(obj=" ".join(target)), str(where + 1))

    def _counting(self, rng: _Rng) -> Layout:
        target = (rng.choice(_COLOR_NAMES), rng.choice(SHAPES))
        count = 1 + rng.randint(min(self.images_per_sample, MAX_COUNT))
        where = rng.sample(range(self.images_per_sample), count)
        images = self._haystack(rng, dict.fromkeys(where, target), [target[0]])
        return Layout(images, _QUESTIONS["counting"].format(obj=" ".join(target)), str(count))

    def _ordering(self, rng: _Rng) -> Layout:
        m = min(self.images_per_sample, ORDER_ITEMS)
        colors = sorted(rng.sample(_COLOR_NAMES, m), key=_COLOR_NAMES.index)  # question order: palette
        items = [(c, rng.choice(SHAPES)) for c in colors]
        where = rng.sample(range(self.images_per_sample), m)  # item j is in image where[j]
        images = self._haystack(rng, dict(zip(where, items)), colors)
        names = [f"the {c} {s}" for c, s in items]
        listed = " and ".join(names) if m == 2 else f"{' , '.join(names[:-1])} and {names[-1]}"
        order = [f"{c} {s}" for _, (c, s) in sorted(zip(where, items))]
        return Layout(images, _QUESTIONS["ordering"].format(objs=listed), " then ".join(order))

    def _needle(self, rng: _Rng) -> Layout:
        needle = (rng.choice(_COLOR_NAMES), rng.choice(SHAPES))
        depth = rng.randint(self.images_per_sample)
        images = self._haystack(rng, {depth: needle}, [needle[0]])
        return Layout(images, _QUESTIONS["needle"].format(color=needle[0]), needle[1])

    # -- scenes and pixels ---------------------------------------------------------------------------------

    def _scene(
        self,
        rng: _Rng,
        colors: Sequence[str],
        fixed: Sequence[Obj] = (),
        wanted: Sequence[tuple[str, str]] = (),
    ) -> tuple[Obj, ...]:
        """One image: the ``fixed`` objects, the ``wanted`` (colour, shape) pairs placed at random, then
        random objects in unused ``colors`` up to a count drawn uniformly from the task's object range."""
        lo, hi = _object_range(self.task, self.objects)
        k = lo + rng.randint(hi - lo + 1)
        placed = list(fixed)
        for color, shape in wanted:
            placed.append(self._place(rng, placed, color, shape))
        used = {o.color for o in placed}
        free = [c for c in colors if c not in used]
        for color in rng.sample(free, max(0, k - len(placed))):
            placed.append(self._place(rng, placed, color, rng.choice(SHAPES)))
        return tuple(placed)

    def _place(self, rng: _Rng, placed: Sequence[Obj], color: str, shape: str) -> Obj:
        """An object at a random free spot: its box keeps ``_GAP`` from every placed object's box."""
        r = rng.uniform(*self.radius)
        for _ in range(40):
            for _ in range(_TRIES):
                cx, cy = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
                if all(max(abs(cx - o.cx), abs(cy - o.cy)) >= r + o.r + _GAP for o in placed):
                    return Obj(color, shape, cx, cy, r)
            r *= 0.85
        return Obj(color, shape, cx, cy, r)  # unreachable for the allowed object counts and radii

    def _render(self, images: Sequence[Sequence[Obj]], g: torch.Generator) -> torch.Tensor:
        """FloatTensor[N, 3, S, S] in [0, 1], quantised to multiples of 1/255."""
        n, S = len(images), self.image_size
        objs = [(i, o) for i, scene in enumerate(images) for o in scene]
        grey = _BACKGROUND[0] + (_BACKGROUND[1] - _BACKGROUND[0]) * torch.rand(n, generator=g)  # [N]
        jitter = _COLOR_JITTER * (2 * torch.rand(len(objs), 3, generator=g) - 1)  # [K, 3]
        noise = _NOISE_STD * torch.randn(n, 3, S, S, generator=g)  # [N, 3, S, S]
        rgb = _PALETTE[[_COLOR_NAMES.index(o.color) for _, o in objs]] + jitter  # [K, 3]
        paint = torch.zeros(n, 3, S, S)
        cover = torch.zeros(n, 1, S, S)
        for shape in SHAPES:  # all objects of one shape, in every image, at once
            sel = [k for k, (_, o) in enumerate(objs) if o.shape == shape]
            if not sel:
                continue
            img = torch.tensor([objs[k][0] for k in sel])  # [K_s]
            geo = torch.tensor([[objs[k][1].cx, objs[k][1].cy, objs[k][1].r] for k in sel])[:, :, None, None]
            mask = shape_mask(shape, S, geo[:, 0], geo[:, 1], geo[:, 2]).float()  # [K_s, S, S]
            paint.index_add_(0, img, mask[:, None] * rgb[sel][:, :, None, None])
            cover.index_add_(0, img, mask[:, None])
        canvas = torch.where(cover > 0, paint / cover.clamp_min(1.0), grey[:, None, None, None])
        return (canvas + noise).clamp_(0.0, 1.0).mul_(255).round_().div_(255)

    # -- metadata the toolkit reads ------------------------------------------------------------------------

    @property
    def chance(self) -> float:
        """Exact-match accuracy of the best guess that ignores the images (see ``chance_accuracy``)."""
        return self.chance_accuracy(self.task, self.images_per_sample, self.objects)

    @staticmethod
    def chance_accuracy(task: str, images_per_sample: int = 1, objects: Sequence[int] = _OBJECTS) -> float:
        """Exact-match accuracy of the best guess from the question alone (the best constant answer; for
        ``ordering``, the best constant order of the items the question names), from the answer distribution.

        position 1/9, spatial 1/4, count_objects 1/(max - min + 1), retrieval 1/N, ordering 1/m! with
        m = min(N, 3), counting 1/min(N, 4), needle 1/4 (shapes); caption: the most likely caption, a scene of
        k objects with distinct colours having probability 1/(n_k * C(6, k) * 4^k) (n_k: object counts).
        """
        task, n, objects, _ = check_args(task, images_per_sample, objects, _RADIUS)
        lo, hi = _object_range(task, objects)
        if task == "caption":
            return max(
                1 / ((hi - lo + 1) * math.comb(len(COLORS), k) * len(SHAPES) ** k) for k in range(lo, hi + 1)
            )
        answers = {
            "position": len(REGIONS),
            "spatial": len(DIRECTIONS),
            "count_objects": hi - lo + 1,
            "retrieval": n,
            "ordering": math.factorial(min(n, ORDER_ITEMS)),
            "counting": min(n, MAX_COUNT),
            "needle": len(SHAPES),
        }[task]
        return 1 / answers

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word the generator can write (sorted), for building a word-level tokenizer."""
        words = {w for text in _QUESTIONS.values() for w in text.split() if not w.startswith("{")}
        words.update(_JOINERS, COLORS, SHAPES, DIRECTIONS)
        words.update(w for region in REGIONS for w in region.split())
        words.update(str(i) for i in range(1, MAX_IMAGES + 1))
        return sorted(words)

    @classmethod
    def validate_config(cls, kwargs: Mapping[str, Any], where: str) -> None:
        """Config-time checks (nothing built): task, image count, object range and radius agree."""
        try:
            check_args(
                kwargs.get("task", "spatial"),
                kwargs.get("images_per_sample", 1),
                kwargs.get("objects", _OBJECTS),
                kwargs.get("radius", _RADIUS),
            )
        except (ValueError, TypeError) as exc:
            raise ChimeraError(f"{where}: dataset 'scenes': {exc}", key=where) from exc
