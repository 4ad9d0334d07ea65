"""AnyRes tiling: LLaVA-NeXT's grid selection worked out by hand, tiles, padding, global view, caps."""

from __future__ import annotations

import pytest
from PIL import Image

from components.encoders.anyres import (
    DEFAULT_GRIDS,
    anyres_max_feature_size,
    parse_grids,
    resize_and_pad,
    select_grid,
    split_tiles,
)

T = 336  # CLIP-336 tile


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        # 1000 x 500 (2:1). Effective resolution = int(w s) * int(h s) capped at w h, s = min(W / w, H / h):
        #   2x2 672x672: s .672 -> 672*336 = 225,792, waste 451,584 - 225,792 = 225,792
        #   1x2 672x336: s .672 -> 225,792, waste 0          <- same effective, least waste
        #   1x3 1008x336: 225,792, waste 112,896; 1x4: 225,792, waste 225,792; 2x1 336x672: s .336 -> 56,448
        ((1000, 500), (1, 2)),
        # 3000 x 1000 (3:1): 1x3 1008x336: s .336 -> 1008*336 = 338,688, waste 0; 1x4: 338,688, waste 112,896;
        #   2x2 / 1x2: s .224 -> 672*224 = 150,528
        ((3000, 1000), (1, 3)),
        # 500 x 1500 (1:3): 3x1 336x1008: s .672 -> 338,688, waste 0
        ((500, 1500), (3, 1)),
        # 1000 x 1000: 2x2 672x672: s .672 -> 451,584, waste 0; every strip keeps 336*336 = 112,896
        ((1000, 1000), (2, 2)),
        # 800 x 600 (4:3): 2x2: s .84 -> 672*504 = 338,688; 1x2 / 1x3: s .56 -> 448*336 = 150,528;
        #   2x1: s .42 -> 336*252 = 84,672
        ((800, 600), (2, 2)),
        # 1000 x 400 (2.5:1): 1x3 1008x336: s .84 -> 840*336 = 282,240, waste 56,448;
        #   1x4: 282,240, waste 169,344; 1x2 / 2x2: s .672 -> 672*268 = 180,096
        ((1000, 400), (1, 3)),
        # 4000 x 900: 1x4 1344x336: s .336 -> 1344*302 = 405,888 beats 1x3 (s .252 -> 1008*226 = 227,808)
        ((4000, 900), (1, 4)),
        # 300 x 300 (smaller than one tile): every grid caps at 90,000; least waste: 1x2 and 2x1 (135,792);
        #   exact tie -> the earlier grid in LLaVA-NeXT's pinpoint order, 2x1 (336 x 672)
        ((300, 300), (2, 1)),
    ],
)
def test_select_grid_follows_llava_next(size, grid) -> None:
    assert select_grid(size[0], size[1], T, DEFAULT_GRIDS) == grid


def test_select_grid_tie_break_is_list_order_and_rows_cols_orientation() -> None:
    assert select_grid(300, 300, T, [(1, 2), (2, 1)]) == (1, 2)
    assert select_grid(300, 300, T, [(2, 1), (1, 2)]) == (2, 1)
    assert select_grid(700, 100, T, [(1, 2), (2, 1)]) == (1, 2)  # wide images want more columns


def test_anyres_max_caps_the_tile_count() -> None:
    assert parse_grids("anyres") == list(DEFAULT_GRIDS)
    assert parse_grids("anyres_max_4") == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert all(r * c <= 9 for r, c in parse_grids("anyres_max_9")) and (3, 3) in parse_grids("anyres_max_9")
    assert select_grid(2000, 2000, 384, parse_grids("anyres_max_9")) == (3, 3)  # 1152^2, waste 0
    assert select_grid(2000, 2000, 384, parse_grids("anyres_max_4")) == (2, 2)
    assert select_grid(200, 200, 384, parse_grids("anyres_max_4")) == (1, 1)  # fits one tile, no waste
    assert parse_grids([[1, 2], [3, 1]]) == [(1, 2), (3, 1)]
    for bad in ("anyres_max_0", "anyres_max", "tiles", [], [[0, 2]]):
        with pytest.raises(ValueError, match="AnyRes grid"):
            parse_grids(bad)


def test_anyres_max_feature_size_as_llava_onevision() -> None:
    # 6 x 6 tiles of 27 x 27 SigLIP tokens capped at 9 tiles: times = 162 / 81 = 2 -> 81 x 81
    assert anyres_max_feature_size(162, 162, 27, 9) == (81, 81)
    # 81 x 108 (3 x 4 tiles): times = sqrt(8748 / 6561) = 1.1547 > 1.1 -> 81 // 1.1547 = 70, 108 // 1.1547 = 93
    assert anyres_max_feature_size(81, 108, 27, 9) == (70, 93)
    # 81 x 81 (3 x 3) is within the cap; 81 x 90 has times 1.054 <= 1.1: left alone
    assert anyres_max_feature_size(81, 81, 27, 9) == (81, 81) and anyres_max_feature_size(81, 90, 27, 9) == (
        81,
        90,
    )


def test_split_tiles_row_major_with_global_view() -> None:
    """1000 x 500, left half red, right half blue -> 1x2 grid at 672 x 336, no padding: tile 0 red, tile 1 blue."""
    image = Image.new("RGB", (1000, 500), (255, 0, 0))
    image.paste(Image.new("RGB", (500, 500), (0, 0, 255)), (500, 0))
    grid = select_grid(*image.size, T)
    tiles, global_view = split_tiles(image, grid, T)
    assert grid == (1, 2) and len(tiles) == 2 and all(t.size == (T, T) for t in tiles)
    assert tiles[0].getpixel((100, 100)) == (255, 0, 0) and tiles[1].getpixel((200, 100)) == (0, 0, 255)
    assert global_view.size == (T, T)  # plain resize of the whole image, as LLaVA-NeXT
    assert global_view.getpixel((50, 50)) == (255, 0, 0) and global_view.getpixel((300, 50)) == (0, 0, 255)

    # 2x2: row-major order (top-left, top-right, bottom-left, bottom-right)
    quad = Image.new("RGB", (672, 672), (0, 0, 0))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for i, colour in enumerate(colours):
        quad.paste(Image.new("RGB", (336, 336), colour), ((i % 2) * 336, (i // 2) * 336))
    tiles, _ = split_tiles(quad, (2, 2), T)
    assert [t.getpixel((168, 168)) for t in tiles] == colours


def test_resize_and_pad_centres_the_image_with_black_bands() -> None:
    """1000 x 400 into 1x3 (1008 x 336): height-bound, 840 x 336 pasted at x = (1008 - 840) // 2 = 84."""
    image = Image.new("RGB", (1000, 400), (255, 255, 255))
    canvas = resize_and_pad(image, (1008, 336))
    assert canvas.size == (1008, 336)
    row = [canvas.getpixel((x, 100)) for x in range(1008)]
    assert (
        row[:84] == [(0, 0, 0)] * 84
        and row[84:924] == [(255, 255, 255)] * 840
        and row[924:] == [(0, 0, 0)] * 84
    )
    tiles, _ = split_tiles(image, (1, 3), T)
    assert tiles[0].getpixel((83, 10)) == (0, 0, 0) and tiles[0].getpixel((84, 10)) == (255, 255, 255)
    assert tiles[2].getpixel((251, 10)) == (255, 255, 255) and tiles[2].getpixel((252, 10)) == (0, 0, 0)
    # width-bound: 500 x 1000 into 672 x 672 -> 336 x 672 at x = 168
    tall = resize_and_pad(Image.new("RGB", (500, 1000), (9, 9, 9)), (672, 672))
    assert tall.getpixel((167, 300)) == (0, 0, 0) and tall.getpixel((168, 300)) == (9, 9, 9)
    assert tall.getpixel((503, 300)) == (9, 9, 9) and tall.getpixel((504, 300)) == (0, 0, 0)
