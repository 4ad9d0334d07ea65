"""AnyRes: a large image as a grid of encoder-sized tiles plus a downscaled global view (LLaVA-NeXT).

LLaVA-NeXT (Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge", 2024; LLaVA-1.5-HD in
arXiv 2310.03744) picks, among candidate tile grids, the one whose resolution keeps the most of the image,
resizes the image into it (aspect ratio kept, black padding), cuts it into ``tile x tile`` crops and prepends
the whole image resized to one tile. Reference: haotian-liu/LLaVA ``llava/mm_utils.py``
(``select_best_resolution``, ``resize_and_pad_image``, ``divide_to_patches``, ``process_anyres_image``) and
LLaVA-VL/LLaVA-NeXT ``llava/model/llava_arch.py`` (``anyres_max_N``).

Pure functions on PIL images, no model involved: the collator/model wiring lives elsewhere. Grids are
``(rows, cols)``; a grid's resolution is ``(cols * tile) x (rows * tile)`` pixels (width x height).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from PIL import Image

# LLaVA-NeXT's pinpoints [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] (width, height) in its
# order (the order breaks exact ties), then the 1x4 / 4x1 strips of LLaVA-1.5-HD's grid family.
DEFAULT_GRIDS: tuple[tuple[int, int], ...] = ((2, 1), (1, 2), (2, 2), (1, 3), (3, 1), (1, 4), (4, 1))


def parse_grids(spec: str | Sequence[Sequence[int]] = "anyres") -> list[tuple[int, int]]:
    """Candidate grids from a config value.

    ``"anyres"``: :data:`DEFAULT_GRIDS`. ``"anyres_max_N"``: every ``(rows, cols)`` with ``rows * cols <= N``
    (row-major order), i.e. at most N tiles per image. A list of ``[rows, cols]`` pairs: those grids.

    LLaVA-OneVision's ``anyres_max_N`` tiles with grids up to 6 x 6 and then caps the *features* at about N
    tiles' worth by bilinear downscaling (:func:`anyres_max_feature_size`); here the same name caps the
    tile count at selection time, which bounds the encoder's work as well as the tokens.
    """
    if isinstance(spec, str):
        if spec == "anyres":
            return list(DEFAULT_GRIDS)
        match = re.fullmatch(r"anyres_max_(\d+)", spec)
        if not match or int(match.group(1)) < 1:
            raise ValueError(
                f"unknown AnyRes grid spec '{spec}'; use 'anyres', 'anyres_max_N' or [[rows, cols], ...]"
            )
        n = int(match.group(1))
        return [(r, c) for r in range(1, n + 1) for c in range(1, n + 1) if r * c <= n]
    grids = [(int(g[0]), int(g[1])) for g in spec]
    if not grids or any(len(g) != 2 for g in spec) or any(r < 1 or c < 1 for r, c in grids):
        raise ValueError(
            f"AnyRes grids must be a non-empty list of [rows, cols] with rows, cols >= 1, got {spec}"
        )
    return grids


def select_grid(
    image_w: int, image_h: int, tile: int, grids: Sequence[Sequence[int]] = DEFAULT_GRIDS
) -> tuple[int, int]:
    """LLaVA-NeXT's ``select_best_resolution`` over tile grids: the ``(rows, cols)`` to use.

    For each grid (resolution ``W = cols * tile``, ``H = rows * tile``) the image is scaled to fit,
    ``s = min(W / w, H / h)``; the effective resolution is ``min(int(w s) * int(h s), w h)`` (upscaling adds
    no information) and the waste ``W H - effective``. The largest effective resolution wins, then the least
    waste; exact ties keep the earlier grid of ``grids``.
    """
    if image_w < 1 or image_h < 1:
        raise ValueError(f"image size must be positive, got {image_w}x{image_h}")
    best, best_effective, best_waste = None, 0, math.inf
    for rows, cols in grids:
        width, height = cols * tile, rows * tile
        scale = min(width / image_w, height / image_h)
        effective = min(int(image_w * scale) * int(image_h * scale), image_w * image_h)
        waste = width * height - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(rows), int(cols)), effective, waste
    if best is None:
        raise ValueError("select_grid needs at least one grid")
    return best


def resize_and_pad(
    image: Image.Image,
    size: tuple[int, int],
    fill: tuple[int, int, int] = (0, 0, 0),
    resample: int = Image.Resampling.BICUBIC,
) -> Image.Image:
    """LLaVA-NeXT's ``resize_and_pad_image``: fit ``image`` into ``size = (width, height)`` keeping its
    aspect ratio (the constrained side exactly, the other ``min(ceil(side * scale), target)``), centred on a
    ``fill`` canvas (black, as LLaVA-NeXT)."""
    w, h = image.size
    target_w, target_h = size
    scale_w, scale_h = target_w / w, target_h / h
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(h * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(w * scale_h), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), fill)
    canvas.paste(
        image.convert("RGB").resize((new_w, new_h), resample),
        ((target_w - new_w) // 2, (target_h - new_h) // 2),
    )
    return canvas


def split_tiles(
    image: Image.Image,
    grid: tuple[int, int],
    tile: int,
    *,
    fill: tuple[int, int, int] = (0, 0, 0),
    resample: int = Image.Resampling.BICUBIC,
) -> tuple[list[Image.Image], Image.Image]:
    """``(tiles, global_view)``: ``rows * cols`` crops of ``tile x tile`` in row-major order from the image
    resized and padded into the grid's resolution, and the whole image resized to ``tile x tile``.

    LLaVA-NeXT feeds ``[global_view] + tiles`` to the encoder; its global view is a plain resize (aspect
    ratio not kept), reproduced here.
    """
    rows, cols = grid
    canvas = resize_and_pad(image, (cols * tile, rows * tile), fill, resample)
    tiles = [
        canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]
    global_view = image.convert("RGB").resize((tile, tile), resample)
    return tiles, global_view


def anyres_max_feature_size(height: int, width: int, unit: int, max_tiles: int) -> tuple[int, int]:
    """LLaVA-OneVision's ``anyres_max_N`` feature cap: a ``height x width`` feature map (``unit`` = tokens per
    tile side) above about ``max_tiles`` tiles of ``unit x unit`` is bilinearly downscaled by
    ``times = sqrt(h w / (N unit^2))`` when ``times > 1.1``, to ``(int(h // times), int(w // times))``."""
    times = math.sqrt(height * width / (max_tiles * unit**2))
    if times > 1.1:
        return int(height // times), int(width // times)
    return height, width
