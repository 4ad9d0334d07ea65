"""Grid arithmetic shared by the token reducers (pool2d, pool1d, the C-Abstractor connector).

A reducer is told either a ``stride`` (window side, LongLLaVA / LLaVA-NeXT-Video style) or a ``target``
(how many tokens to produce). Both are checked here so every reducer rejects the same degenerate configs
with the same message instead of silently collapsing an image to one token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_stride(who: str, grid: tuple[int, int], stride: int) -> None:
    """A ``stride x stride`` window must fit in the ``gh x gw`` grid (stride 1..min(gh, gw)).

    A larger stride would leave one token per row/column (one per image on a square grid) whatever its
    value: that is a configuration mistake, not a pooling choice. ``target: 1`` asks for one token explicitly.
    """
    gh, gw = grid
    if int(stride) < 1:
        raise ValueError(f"{who} stride must be >= 1, got {stride}")
    if stride > min(gh, gw):
        raise ValueError(
            f"{who} stride {stride} is larger than the {gh}x{gw} patch grid (a window must fit in the grid: "
            f"stride 1..{min(gh, gw)}); use a smaller stride, or target: [rows, cols] (target: 1 for one "
            "token per image)"
        )


def target_grid(who: str, grid: tuple[int, int], target: int | Sequence[int]) -> tuple[int, int]:
    """The output grid ``(oh, ow)`` for a ``target`` on a ``gh x gw`` grid.

    ``target`` is either ``[rows, cols]`` (any ``1 <= rows <= gh``, ``1 <= cols <= gw``) or a token count
    ``T``. A count must keep the grid's aspect ratio exactly (``oh * ow == T`` and ``oh / ow == gh / gw``):
    on a square grid T is a perfect square (144 -> 12 x 12 on 24 x 24 or 27 x 27), on 24 x 48 it is
    ``2 k^2`` (72 -> 6 x 12). ``T = 1`` is always accepted (the mean of the whole image). Anything else
    is refused with the nearest valid counts, never silently distorted: give ``[rows, cols]`` instead.
    """
    gh, gw = grid
    if isinstance(target, Sequence) and not isinstance(target, str):
        if len(target) != 2:
            raise ValueError(f"{who} target must be a token count or [rows, cols], got {list(target)}")
        oh, ow = int(target[0]), int(target[1])
        if not (1 <= oh <= gh and 1 <= ow <= gw):
            raise ValueError(
                f"{who} target grid {oh}x{ow} does not fit in the {gh}x{gw} patch grid "
                f"(rows 1..{gh}, cols 1..{gw}: pooling cannot add tokens)"
            )
        return oh, ow
    t = int(target)
    if t < 1:
        raise ValueError(f"{who} target must be >= 1 token, got {t}")
    if t > gh * gw:
        raise ValueError(
            f"{who} target {t} is more than the {gh}x{gw} = {gh * gw} tokens of the patch grid "
            "(pooling cannot add tokens)"
        )
    if t == 1:
        return 1, 1
    exact = _aspect_grids(gh, gw)
    for oh, ow in exact:
        if oh * ow == t:
            return oh, ow
    nearest = sorted({oh * ow for oh, ow in exact}, key=lambda n: (abs(n - t), n))[:3]
    raise ValueError(
        f"{who} target {t} tokens cannot keep the {gh}x{gw} grid's aspect ratio (counts that can: "
        f"{', '.join(map(str, sorted(nearest)))}); give target: [rows, cols] for any other layout"
    )


def _aspect_grids(gh: int, gw: int) -> list[tuple[int, int]]:
    """Every ``(oh, ow)`` inside the grid with ``oh / ow == gh / gw`` exactly."""
    g = math.gcd(gh, gw)
    rh, rw = gh // g, gw // g
    return [(k * rh, k * rw) for k in range(1, g + 1)]
