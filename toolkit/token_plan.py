"""The token plan: how many decoder positions each image takes, and how its features fill them.

One object, built once from the model's vision settings (``model.vision``) and its parts' geometry, is shared
by the collator (which reserves that many ``<image>`` slots per image, in the data workers) and the model
(which lays the pooled features out in the same order before its single ``masked_scatter``). Both call the
same functions below, so the two can never disagree about a count.

An image reaches the model as one or more *views* of ``image_size x image_size`` pixels (all views of a batch
go through the encoder in one call); each view becomes ``view_tokens`` tokens on a ``view_grid`` after the
pooler and connector. Per image, the batch carries one layout row ``(views, rows, cols, width, height, frame)``:

- a plain image: ``(1, 0, 0, w, h, 0)``, ``view_tokens`` tokens;
- a video frame: ``(1, 0, 0, w, h, 1)``, ``view_tokens`` tokens, or with ``frame_stride`` its token grid
  average-pooled after the connector to ``ceil(oh / s) x ceil(ow / s)`` (LLaVA-NeXT-Video's
  ``mm_spatial_pool_stride``: frames pooled, images not);
- an AnyRes image (LLaVA-NeXT, Liu et al. 2024; reference haotian-liu/LLaVA ``llava/mm_utils.py`` and
  ``llava/model/llava_arch.py``, LLaVA-VL/LLaVA-NeXT): ``(1 + rows * cols, rows, cols, w, h, 0)``: the global
  view (the whole image resized to one tile) followed by the ``rows x cols`` tiles in row-major order.

AnyRes layouts (``model.vision.layout``)::

    llava_next  [global view tokens][tile map row 0 | NL][tile map row 1 | NL] ...
                the tiles' token grids are stitched into one (rows * oh) x (cols * ow) map, the rows and columns
                that only show padding are cut (``unpad``, LLaVA-NeXT's ``unpad_image``), and a learned newline
                embedding ends each feature row (``newline``)
    longllava   [global view tokens][tile 0][tile 1] NL [tile 2][tile 3] NL ...
                sub-images in rows after the global view (LongLLaVA, arXiv 2409.02889), each tile whole, one
                newline embedding after each row of tiles (``newline``)

LLaVA-NeXT at 336 px with CLIP (24 x 24 tokens per view, no pooling) and a 672 x 672 image (2 x 2 tiles):
576 + 48 * 48 + 48 = 2928 tokens with newlines, 2880 without.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.errors import ChimeraError

LAYOUTS = ("llava_next", "longllava")
LAYOUT_FIELDS = 6  # views, rows, cols, width, height, frame


@dataclass(frozen=True)
class VisionSettings:
    """``model.vision``: AnyRes on/off, candidate grids, newline embedding, unpadding, layout, frame pooling."""

    anyres: bool = False
    grids: Any = "anyres"
    newline: bool = True
    unpad: bool = True
    layout: str = "llava_next"
    frame_stride: int | None = None

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None, where: str = "model.vision") -> VisionSettings:
        node = dict(node or {})
        unknown = sorted(set(node) - set(cls.__dataclass_fields__))
        if unknown:
            raise ChimeraError(
                f"{where}.{unknown[0]}: unknown key; known keys: {', '.join(cls.__dataclass_fields__)}",
                key=f"{where}.{unknown[0]}",
            )
        settings = cls(**node)
        if settings.layout not in LAYOUTS:
            raise ChimeraError(
                f"{where}.layout: '{settings.layout}' is not one of {', '.join(LAYOUTS)}",
                key=f"{where}.layout",
            )
        if settings.frame_stride is not None and int(settings.frame_stride) < 1:
            raise ChimeraError(
                f"{where}.frame_stride: expected an integer >= 1 or null, got {settings.frame_stride}",
                key=f"{where}.frame_stride",
            )
        from components.encoders.anyres import parse_grids  # a pure helper, no component

        try:
            parse_grids(settings.grids)
        except (ValueError, TypeError) as exc:
            raise ChimeraError(f"{where}.grids: {exc}", key=f"{where}.grids") from exc
        return settings


@dataclass(frozen=True)
class TokenPlan:
    """Tokens per image from its size and the model's vision settings (see the module docstring).

    Args:
        image_size: the encoder's input side (one view, one AnyRes tile).
        view_tokens: tokens one view gives after pooler and connector.
        view_grid: their grid ``(oh, ow)``, or None when they are not a grid (pool1d, prefix tokens); the
            ``llava_next`` layout needs a grid.
        settings: ``model.vision``.
    """

    image_size: int
    view_tokens: int
    view_grid: tuple[int, int] | None
    settings: VisionSettings = field(default_factory=VisionSettings)

    def __post_init__(self) -> None:
        s = self.settings
        if s.anyres and s.layout == "llava_next" and self.view_grid is None:
            raise ChimeraError(
                "model.vision.layout: llava_next stitches the tiles' token grids into one map, but the pooled "
                "tokens have no grid (pool1d, or an encoder keeping prefix tokens); use layout: longllava or a "
                "grid-keeping pooler (identity, pool2d)",
                key="model.vision.layout",
            )
        if s.frame_stride is not None:
            if self.view_grid is None:
                raise ChimeraError(
                    "model.vision.frame_stride: frames are pooled on their token grid, but the pooled tokens have "
                    "no grid (pool1d, or an encoder keeping prefix tokens); remove frame_stride or keep a grid",
                    key="model.vision.frame_stride",
                )
            if s.frame_stride > min(self.view_grid):
                raise ChimeraError(
                    f"model.vision.frame_stride: {s.frame_stride} is larger than the {self.view_grid[0]}x"
                    f"{self.view_grid[1]} token grid of a frame",
                    key="model.vision.frame_stride",
                )

    @property
    def frame_grid(self) -> tuple[int, int] | None:
        """The token grid of a video frame after ``frame_stride`` pooling (None: frames are not pooled)."""
        s = self.settings.frame_stride
        if s is None:
            return None
        return math.ceil(self.view_grid[0] / s), math.ceil(self.view_grid[1] / s)

    @property
    def frame_tokens(self) -> int:
        """Decoder positions of one video frame."""
        grid = self.frame_grid
        return self.view_tokens if grid is None else grid[0] * grid[1]

    @property
    def grids(self) -> list[tuple[int, int]]:
        from components.encoders.anyres import parse_grids

        return parse_grids(self.settings.grids)

    @property
    def max_tiles(self) -> int:
        return max(r * c for r, c in self.grids)

    def largest_image(self) -> tuple[tuple[int, int] | None, int, int]:
        """The most one image (not a frame) can take, for worst-case estimates (``toolkit.memory``):
        ``(grid, tokens, views)``. With AnyRes: the allowed grid whose image of its own shape (``cols * S x
        rows * S``: nothing unpadded) takes the most tokens, and ``1 + max_tiles`` encoder views (the global
        view and the tiles of the grid with the most); without: ``(None, view_tokens, 1)``."""
        if not self.settings.anyres:
            return None, self.view_tokens, 1
        S = self.image_size
        by_grid = {(r, c): self.tokens(self.row(c * S, r * S, (r, c))) for r, c in self.grids}
        grid = max(by_grid, key=lambda g: (by_grid[g], g[0] * g[1]))
        return grid, by_grid[grid], 1 + self.max_tiles

    def grid_for(self, width: int, height: int, max_tiles: int | None = None) -> tuple[int, int] | None:
        """The AnyRes grid ``(rows, cols)`` for a ``width x height`` image by LLaVA-NeXT's rule among the
        grids of at most ``max_tiles`` tiles; None when AnyRes is off or no grid is allowed (one view)."""
        if not self.settings.anyres:
            return None
        from components.encoders.anyres import select_grid

        grids = [g for g in self.grids if max_tiles is None or g[0] * g[1] <= max_tiles]
        return select_grid(width, height, self.image_size, grids) if grids else None

    def row(self, width: int, height: int, grid: tuple[int, int] | None, frame: bool = False) -> list[int]:
        """The layout row ``[views, rows, cols, width, height, frame]`` of one image (a frame has no grid)."""
        if grid is None or frame:
            return [1, 0, 0, int(width), int(height), int(frame)]
        return [1 + grid[0] * grid[1], int(grid[0]), int(grid[1]), int(width), int(height), 0]

    def tile_map(self, rows: int, cols: int, width: int, height: int) -> tuple[int, int, int, int]:
        """``llava_next``: the stitched token map's kept window ``(top, bottom, left, right)``.

        The map is ``rows * oh`` x ``cols * ow``; with ``unpad`` the rows (or columns) that only show the
        padding of ``resize_and_pad`` are cut, as LLaVA-NeXT's ``unpad_image``: the image fills the map's
        width when it is relatively wider (then ``new_h = int(round(h * W / w, 7))`` rows are kept, centred),
        else its height.
        """
        oh, ow = self.view_grid
        H, W = rows * oh, cols * ow
        if not self.settings.unpad:
            return 0, H, 0, W
        if width / height > W / H:
            new_h = int(round(height * (W / width), 7))
            pad = (H - new_h) // 2
            return pad, H - pad, 0, W
        new_w = int(round(width * (H / height), 7))
        pad = (W - new_w) // 2
        return 0, H, pad, W - pad

    def tokens(self, row: Sequence[int], newline: bool | None = None) -> int:
        """Decoder positions of one image with layout ``row`` (``newline`` overrides the setting)."""
        views, rows, cols, width, height, frame = (int(v) for v in row)
        if frame:
            return self.frame_tokens
        if rows == 0:
            return self.view_tokens * views
        nl = self.settings.newline if newline is None else newline
        if self.settings.layout == "longllava":
            return self.view_tokens * (1 + rows * cols) + (rows if nl else 0)
        top, bottom, left, right = self.tile_map(rows, cols, width, height)
        return self.view_tokens + (bottom - top) * (right - left + (1 if nl else 0))

    def image_tokens(self, width: int, height: int, newline: bool | None = None) -> int:
        """Tokens of a ``width x height`` image (not a frame), AnyRes included."""
        return self.tokens(self.row(width, height, self.grid_for(width, height)), newline)

    def arrange(self, feats: Tensor, layout: Tensor, newline: Tensor | None) -> Tensor:
        """Per-view features ``[V, view_tokens, D]`` -> the images' token sequences concatenated ``[S, D]``.

        ``layout``: ``[N, 6]`` rows (views in the order of ``feats``); ``newline``: ``[D]`` or None. The
        inverse bookkeeping of ``tokens``: ``S = sum(tokens(row))``.
        """
        out, v = [], 0
        for views, rows, cols, width, height, frame in layout.tolist():
            if frame and self.frame_grid is not None:  # NeXT-Video: a frame's grid pooled after the projector
                s, (oh, ow), D = self.settings.frame_stride, self.view_grid, feats.shape[-1]
                grid = feats[v].transpose(0, 1).reshape(1, D, oh, ow)  # [1, D, oh, ow]
                grid = F.avg_pool2d(grid, kernel_size=s, stride=s, ceil_mode=True)  # [1, D, oh', ow']
                out.append(grid.flatten(2)[0].transpose(0, 1))  # [oh' * ow', D]
                v += 1
                continue
            if rows == 0:
                out.append(feats[v : v + views].reshape(-1, feats.shape[-1]))
                v += views
                continue
            base, tiles = feats[v], feats[v + 1 : v + views]  # [P, D], [rows * cols, P, D]
            v += views
            out.append(base)
            if self.settings.layout == "longllava":
                for r in range(rows):
                    out.append(tiles[r * cols : (r + 1) * cols].reshape(-1, feats.shape[-1]))
                    if newline is not None:
                        out.append(newline[None])
                continue
            oh, ow = self.view_grid
            D = feats.shape[-1]
            grid = (
                tiles.reshape(rows, cols, oh, ow, D).permute(0, 2, 1, 3, 4).reshape(rows * oh, cols * ow, D)
            )
            top, bottom, left, right = self.tile_map(rows, cols, width, height)
            grid = grid[top:bottom, left:right]  # [H', W', D]
            if newline is not None:
                grid = torch.cat([grid, newline.expand(grid.shape[0], 1, D)], dim=1)  # [H', W' + 1, D]
            out.append(grid.reshape(-1, D))
        if v != feats.shape[0]:
            raise ChimeraError(f"image layout names {v} views but the batch has {feats.shape[0]}")
        return torch.cat(out) if out else feats.reshape(0, feats.shape[-1])


class ImageNewline(nn.Module):
    """LLaVA-NeXT's learned ``image_newline``: one ``[d_model]`` vector ending each row of AnyRes features.

    Initialised as LLaVA-NeXT does, ``randn(d_model) / sqrt(d_model)``; it trains with the projector (stage
    globs: ``image_newline.*``).
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        with torch.no_grad():
            self.weight.normal_(0.0, 1.0 / math.sqrt(self.weight.numel()))

    def forward(self) -> Tensor:
        return self.weight
