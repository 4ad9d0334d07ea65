"""``synthetic_shapes``: procedural single- and multi-image VQA that needs no download.

Each image shows one coloured shape (circle, square, triangle or cross; red, green, blue, yellow, purple or
orange) at a random position and size on a grey background with light noise, drawn with torch ops only.
Samples are LLaVA-format conversations whose answer cannot be given without looking at the image(s):

- ``color``:   ``<image>\\nwhat color is the shape ?`` -> ``red``
- ``shape``:   ``<image>\\nwhat shape is in the image ?`` -> ``circle``
- ``caption``: ``<image>\\ndescribe the image .`` -> ``a red circle`` (alignment, stage 1)
- ``compare``: ``<image> <image>\\nwhich image shows a circle ?`` -> ``second`` (exactly one image matches;
  the question asks for a shape or for a colour), needs ``images_per_sample >= 2``.

With ``images_per_sample = n > 1`` the single-image tasks name one image ("what color is the shape in the
second image ?") and captions describe every image ("a red circle and a blue square").

Everything is deterministic in (seed, split, index): each sample draws from its own ``torch.Generator``, so
workers, ranks and epochs see the same sample for the same index, and train and val differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch.utils.data import Dataset

from toolkit.data.markup import IMAGE as _IMAGE  # the placeholder the collator expands
from toolkit.errors import did_you_mean
from toolkit.registry import register

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.55, 0.15, 0.75),
    "orange": (1.00, 0.55, 0.00),
}
SHAPES = ("circle", "square", "triangle", "cross")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
TASKS = ("color", "shape", "caption", "compare")

_QUESTIONS = {
    "color": "what color is the shape ?",
    "shape": "what shape is in the image ?",
    "caption": "describe the image .",
}
_QUESTIONS_MULTI = {
    "color": "what color is the shape in the {ordinal} image ?",
    "shape": "what shape is in the {ordinal} image ?",
    "caption": "describe the images .",
}
_COMPARE_SHAPE = "which image shows a {shape} ?"
_COMPARE_COLOR = "which image shows a {color} shape ?"

# Geometry, as fractions of the image side.
_RADIUS = (0.18, 0.32)  # half extent of a shape
_BACKGROUND = (0.35, 0.65)  # grey level
_COLOR_JITTER = 0.05
_NOISE_STD = 0.03


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1]: ``y`` [size, 1], ``x`` [1, size]."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return c[:, None], c[None, :]


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> torch.Tensor:
    """Boolean [size, size] mask of ``shape`` at centre (cx, cy), half extent ``r`` (fractions of size)."""
    y, x = _grid(size)
    dx, dy = (x - cx).abs(), y - cy  # dy grows downwards
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (dx <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    if shape == "triangle":  # apex up, base at the bottom
        return (dy <= r) & (dx <= (dy + r) / 2)
    if shape == "cross":
        w = r / 3
        return ((dx <= w) & (dy.abs() <= r)) | ((dy.abs() <= w) & (dx <= r))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _sample_seed(seed: int, split: str, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@register("dataset", "synthetic_shapes")
class SyntheticShapes(Dataset):
    """Procedural coloured-shape VQA (color / shape / caption / compare), deterministic, no download.

    Args:
        size: number of samples.
        seed: base seed; with ``split`` and the index it fixes every sample.
        image_size: side of the square images (set by the toolkit from the encoder).
        tasks: any of ``color``, ``shape``, ``caption``, ``compare``; sample ``i`` gets
            ``tasks[i % len(tasks)]``.
        images_per_sample: images per conversation (``compare`` needs at least 2).
        split: mixed into every sample's seed so that ``train`` and ``val`` differ.
        radius: [min, max] half extent of a shape, as a fraction of the image side.
        jitter: how much of the free room a shape's centre may use (1: anywhere it fits, 0: centred).
            Random placement is what makes ``shape`` slow to learn for a ViT trained from scratch (it must
            learn translation invariance); small jitter keeps a quick run quick.
    """

    def __init__(
        self,
        size: int = 2000,
        seed: int = 0,
        image_size: int = 32,
        tasks: list[str] = ("color", "shape"),
        images_per_sample: int = 1,
        split: str = "train",
        radius: tuple[float, float] = _RADIUS,
        jitter: float = 1.0,
    ):
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = tuple(str(t) for t in tasks)
        if not tasks:
            raise ValueError(f"tasks is empty; choose from {', '.join(TASKS)}")
        for task in tasks:
            if task not in TASKS:
                raise ValueError(
                    f"unknown task '{task}'{did_you_mean(task, TASKS)}; tasks: {', '.join(TASKS)}"
                )
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        if not 1 <= int(images_per_sample) <= len(ORDINALS):
            raise ValueError(f"images_per_sample must be in 1..{len(ORDINALS)}, got {images_per_sample}")
        if "compare" in tasks and int(images_per_sample) < 2:
            raise ValueError(f"task 'compare' needs images_per_sample >= 2, got {images_per_sample}")
        radius = tuple(float(r) for r in radius)
        if len(radius) != 2 or not 0.05 <= radius[0] <= radius[1] <= 0.5:
            raise ValueError(f"radius must be [min, max] with 0.05 <= min <= max <= 0.5, got {list(radius)}")
        if not 0.0 <= float(jitter) <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {jitter}")
        self.radius, self.jitter = radius, float(jitter)
        self.size = int(size)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.tasks = tasks
        self.images_per_sample = int(images_per_sample)
        self.split = str(split)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"id", "images": FloatTensor[n, 3, S, S] in [0, 1], "conversations": [human, gpt]}``."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        g = torch.Generator().manual_seed(_sample_seed(self.seed, self.split, index))
        task = self.tasks[index % len(self.tasks)]
        n = self.images_per_sample
        if task == "compare":
            specs, question, answer = self._compare(g, n)
        else:
            specs = [self._random_spec(g) for _ in range(n)]
            question, answer = self._ask(task, specs, g)
        images = torch.stack([self._draw(color, shape, g) for color, shape in specs])
        placeholders = " ".join([_IMAGE] * n)
        return {
            "id": f"synthetic_shapes-{self.split}-{self.seed}-{index}",
            "images": images,
            "conversations": [
                {"from": "human", "value": f"{placeholders}\n{question}"},
                {"from": "gpt", "value": answer},
            ],
        }

    # -- content -----------------------------------------------------------------------------------------

    @staticmethod
    def _randint(g: torch.Generator, high: int) -> int:
        return int(torch.randint(high, (1,), generator=g))

    def _random_spec(self, g: torch.Generator) -> tuple[str, str]:
        colors = list(COLORS)
        return colors[self._randint(g, len(colors))], SHAPES[self._randint(g, len(SHAPES))]

    def _ask(self, task: str, specs: list[tuple[str, str]], g: torch.Generator) -> tuple[str, str]:
        if task == "caption":
            return (_QUESTIONS if len(specs) == 1 else _QUESTIONS_MULTI)[task], " and ".join(
                f"a {color} {shape}" for color, shape in specs
            )
        which = 0 if len(specs) == 1 else self._randint(g, len(specs))
        answer = specs[which][0] if task == "color" else specs[which][1]
        if len(specs) == 1:
            return _QUESTIONS[task], answer
        return _QUESTIONS_MULTI[task].format(ordinal=ORDINALS[which]), answer

    def _compare(self, g: torch.Generator, n: int) -> tuple[list[tuple[str, str]], str, str]:
        """Exactly one of ``n`` images has the asked attribute (a shape or a colour)."""
        colors = list(COLORS)
        by_color = self._randint(g, 2) == 0
        target = self._randint(g, n)
        specs = []
        if by_color:
            wanted = colors[self._randint(g, len(colors))]
            others = [c for c in colors if c != wanted]
            for i in range(n):
                color = wanted if i == target else others[self._randint(g, len(others))]
                specs.append((color, SHAPES[self._randint(g, len(SHAPES))]))
            question = _COMPARE_COLOR.format(color=wanted)
        else:
            wanted = SHAPES[self._randint(g, len(SHAPES))]
            others = [s for s in SHAPES if s != wanted]
            for i in range(n):
                shape = wanted if i == target else others[self._randint(g, len(others))]
                specs.append((colors[self._randint(g, len(colors))], shape))
            question = _COMPARE_SHAPE.format(shape=wanted)
        return specs, question, ORDINALS[target]

    def _draw(self, color: str, shape: str, g: torch.Generator) -> torch.Tensor:
        """FloatTensor[3, S, S] in [0, 1]: grey background, light noise, one shape of ``color``."""
        S = self.image_size
        u = torch.rand(6, generator=g).tolist()
        r = self.radius[0] + (self.radius[1] - self.radius[0]) * u[0]
        room = (1 - 2 * r) * self.jitter  # the centre moves within [0.5 - room/2, 0.5 + room/2]
        cx = 0.5 + room * (u[1] - 0.5)
        cy = 0.5 + room * (u[2] - 0.5)
        grey = _BACKGROUND[0] + (_BACKGROUND[1] - _BACKGROUND[0]) * u[3]
        rgb = torch.tensor(COLORS[color]) + _COLOR_JITTER * (2 * torch.rand(3, generator=g) - 1)
        mask = shape_mask(shape, S, cx, cy, r)  # [S, S]
        image = torch.where(mask, rgb[:, None, None], torch.full((3, 1, 1), grey))  # [3, S, S]
        image = image + _NOISE_STD * torch.randn(3, S, S, generator=g)
        return image.clamp_(0.0, 1.0)

    # -- metadata the toolkit reads ------------------------------------------------------------------------

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word the generator can write (sorted), for building a word-level tokenizer."""
        texts = [*_QUESTIONS.values(), *_QUESTIONS_MULTI.values(), _COMPARE_SHAPE, _COMPARE_COLOR, "a and"]
        words = {w for text in texts for w in text.split() if not w.startswith("{")}
        words.update(COLORS, SHAPES, ORDINALS)
        return sorted(words)

    @staticmethod
    def chance_accuracy(tasks: Sequence[str] = ("color", "shape"), images_per_sample: int = 1) -> float:
        """Exact-match accuracy of the best constant answer per task, averaged over ``tasks``.

        color 1/6, shape 1/4, caption (1/24)^n, compare 1/n (n = images per sample); all answers are drawn
        uniformly, so no constant beats these.
        """
        if isinstance(tasks, str):
            tasks = [tasks]
        n = int(images_per_sample)
        per_task = {
            "color": 1 / len(COLORS),
            "shape": 1 / len(SHAPES),
            "caption": (1 / (len(COLORS) * len(SHAPES))) ** n,
            "compare": 1 / n if n >= 2 else float("nan"),
        }
        for task in tasks:
            if task not in per_task:
                raise ValueError(
                    f"unknown task '{task}'{did_you_mean(task, TASKS)}; tasks: {', '.join(TASKS)}"
                )
        if "compare" in tasks and n < 2:
            raise ValueError(f"task 'compare' needs images_per_sample >= 2, got {n}")
        return sum(per_task[t] for t in tasks) / len(tasks)
