"""2D pooling on the patch grid: LongLLaVA (arXiv 2409.02889) and LLaVA-NeXT-Video.

LongLLaVA pools CLIP's 24 x 24 patch grid to 12 x 12 = 144 tokens per image before the projector (2D pooling
beats 1D pooling in its ablation; 6 x 6 = 36 tokens for the 1000-image setting) with
``F.interpolate(..., size=(12, 12), mode="bilinear", align_corners=False)`` (FreedomIntelligence/LongLLaVA
``llava/model/multimodal_encoder/clip_encoder.py``): ``{target: 144, mode: bilinear}`` here, which on an
even grid equals 2 x 2 average pooling. LLaVA-NeXT-Video applies the same reduction per frame after the
projector, by ``avg_pool2d`` / ``max_pool2d`` of stride 2 or by bilinear resizing to
``ceil(g / stride)`` (reference: LLaVA-VL/LLaVA-NeXT ``llava_arch.py``, ``get_2dPool``, modes average,
max and bilinear).

Two ways to say how much to reduce, one per config:

- ``stride: s`` (default 2): the output grid is ``ceil(gh / s) x ceil(gw / s)``. avg/max use
  non-overlapping ``s x s`` windows in ceil mode (partial edge windows hold only real tokens), bilinear
  resizes to that size. SigLIP-so400m's odd 27 x 27 grid gives 14 x 14 = 196 tokens with stride 2.
- ``target: T`` (a token count keeping the grid's aspect ratio) or ``target: [rows, cols]``: avg/max use
  adaptive pooling (PyTorch's windows ``[floor(i g / o), ceil((i + 1) g / o))``, which overlap by one token
  when ``o`` does not divide ``g``), bilinear resizes to that size. ``target: 144`` is 12 x 12 on CLIP's
  24 x 24 (identical to stride 2) and exactly 144 on SigLIP's 27 x 27, where no integer stride gives 144.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.poolers._grid import check_stride, target_grid
from toolkit.errors import ChimeraError
from toolkit.registry import register

MODES = ("avg", "max", "bilinear")


@register("pooler", "pool2d")
class Pool2d(nn.Module):
    """2D average / max pooling or bilinear resizing of the patch grid: ``[N, gh * gw, C] -> [N, oh * ow, C]``.

    Tokens stay row-major. With ``stride`` (default 2): ``oh = ceil(gh / stride)``,
    ``ow = ceil(gw / stride)``, and the window must fit in the grid (``stride <= min(gh, gw)``: a larger one
    is an error, not one token per image). With ``target`` (a token count or ``[rows, cols]``): exactly that
    grid, by adaptive pooling (avg/max) or bilinear resizing.

    ::

        stride 2, avg, 4 x 4:       bilinear, 5 x 5 -> 3 x 3 (align_corners False):
        [ 0  1 | 2  3]              output row i samples input row (i + 0.5) * 5 / 3 - 0.5
        [ 4  5 | 6  7]   -> [ 2.5  4.5]     = 1/3, 2, 11/3 (linear blend of the two nearest rows)
        [ 8  9 |10 11]      [10.5 12.5]
        [12 13 |14 15]

    Args:
        grid: encoder patch grid ``(gh, gw)`` (derived; None when the encoder keeps prefix tokens, which
            2D pooling cannot place: set the encoder's ``drop_prefix_tokens: true``).
        n_tokens: tokens per image from the encoder (derived; must equal ``gh * gw``).
        stride: window side (2 gives 24 x 24 -> 12 x 12 = 144 tokens, 4 gives 6 x 6 = 36); unused when
            ``target`` is given (setting both to other values is an error).
        target: output token count keeping the aspect ratio (144, 36, 1...) or ``[rows, cols]``; replaces
            ``stride``.
        mode: ``avg``, ``max`` or ``bilinear`` (``F.interpolate``, ``align_corners=False``, no antialias,
            as LongLLaVA and LLaVA-NeXT).
    """

    def __init__(
        self,
        *,
        grid: tuple[int, int] | None,
        n_tokens: int,
        stride: int = 2,
        target: int | tuple[int, int] | None = None,
        mode: str = "avg",
    ) -> None:
        super().__init__()
        if grid is None:
            raise ChimeraError(
                "pooler pool2d needs the encoder's patch grid, but the encoder keeps prefix (CLS/register) "
                "tokens, which have no place on the grid; set the encoder's drop_prefix_tokens: true, "
                "or use pool1d / identity"
            )
        if mode not in MODES:
            raise ValueError(f"pool2d mode '{mode}' is not supported; allowed modes: {', '.join(MODES)}")
        gh, gw = int(grid[0]), int(grid[1])
        if gh * gw != int(n_tokens):
            raise ChimeraError(
                f"pool2d: grid {gh}x{gw} has {gh * gw} tokens but the encoder gives {n_tokens}"
            )
        if target is not None and stride != 2:
            raise ValueError(
                f"pool2d takes stride or target, not both (got stride {stride}, target {target})"
            )
        self.grid = (gh, gw)
        self.mode = mode
        self.n_tokens = gh * gw
        self.target = target if target is None or isinstance(target, int) else tuple(target)
        if target is None:
            self.stride: int | None = int(stride)
            check_stride("pool2d", self.grid, self.stride)
            self.out_grid: tuple[int, int] = (math.ceil(gh / self.stride), math.ceil(gw / self.stride))
        else:
            self.stride = None
            self.out_grid = target_grid("pool2d", self.grid, target)
        self.num_tokens: int = self.out_grid[0] * self.out_grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, gh * gw, C]`` -> ``[N, oh * ow, C]``."""
        n, length, c = x.shape
        if length != self.n_tokens:
            raise ValueError(
                f"pool2d expects {self.n_tokens} tokens per image (grid {self.grid}), got {length}"
            )
        y = x.transpose(1, 2).reshape(n, c, *self.grid)  # [N, C, gh, gw]
        if self.mode == "bilinear":
            y = F.interpolate(y, size=self.out_grid, mode="bilinear", align_corners=False)
        elif self.stride is not None:
            # padding=0 + ceil_mode: partial edge windows are divided by their real size only.
            pool = F.avg_pool2d if self.mode == "avg" else F.max_pool2d
            y = pool(y, kernel_size=self.stride, stride=self.stride, ceil_mode=True)
        elif self.mode == "avg":
            y = F.adaptive_avg_pool2d(y, self.out_grid)
        else:
            y = F.adaptive_max_pool2d(y, self.out_grid)
        return y.flatten(2).transpose(1, 2)  # [N, oh * ow, C]

    def extra_repr(self) -> str:
        how = f"stride={self.stride}" if self.stride is not None else f"target={self.target}"
        return f"{how}, mode={self.mode}, grid={self.grid}->{self.out_grid}"
