"""2D pooling on the patch grid: LongLLaVA (arXiv 2409.02889) and LLaVA-NeXT-Video.

LongLLaVA pools CLIP's 24 x 24 patch grid to 12 x 12 = 144 tokens per image with stride-2 average pooling
before the projector (2D pooling beats 1D pooling in its ablation; 6 x 6 = 36 tokens with stride 4 for the
1000-image setting). LLaVA-NeXT-Video applies the same stride-2 ``avg_pool2d`` per frame (reference:
LLaVA-VL/LLaVA-NeXT ``llava_arch.py``, ``get_2dPool``). SigLIP-so400m's odd 27 x 27 grid pools to 14 x 14
with ceil mode: the last row and column average only the real tokens they cover.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.errors import ChimeraError
from toolkit.registry import register

MODES = ("avg", "max")


@register("pooler", "pool2d")
class Pool2d(nn.Module):
    """Average (or max) pooling of ``stride x stride`` patches: ``[N, gh * gw, C] -> [N, oh * ow, C]``.

    ``oh = ceil(gh / stride)``, ``ow = ceil(gw / stride)``; tokens stay row-major. Windows do not overlap and
    partial windows at the bottom/right edge average only the tokens they hold (no zero padding).

    Args:
        grid: encoder patch grid ``(gh, gw)`` (derived; None when the encoder keeps prefix tokens, which
            2D pooling cannot place: set the encoder's ``drop_prefix_tokens: true``).
        n_tokens: tokens per image from the encoder (derived; must equal ``gh * gw``).
        stride: window side (2 gives 24 x 24 -> 12 x 12 = 144 tokens).
        mode: ``avg`` or ``max``.
    """

    def __init__(
        self, *, grid: tuple[int, int] | None, n_tokens: int, stride: int = 2, mode: str = "avg"
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
        if int(stride) < 1:
            raise ValueError(f"pool2d stride must be >= 1, got {stride}")
        gh, gw = int(grid[0]), int(grid[1])
        if gh * gw != int(n_tokens):
            raise ChimeraError(
                f"pool2d: grid {gh}x{gw} has {gh * gw} tokens but the encoder gives {n_tokens}"
            )
        self.grid = (gh, gw)
        self.stride = int(stride)
        self.mode = mode
        self.n_tokens = gh * gw
        self.out_grid: tuple[int, int] = (math.ceil(gh / self.stride), math.ceil(gw / self.stride))
        self.num_tokens: int = self.out_grid[0] * self.out_grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, gh * gw, C]`` -> ``[N, oh * ow, C]``."""
        n, length, c = x.shape
        if length != self.n_tokens:
            raise ValueError(
                f"pool2d expects {self.n_tokens} tokens per image (grid {self.grid}), got {length}"
            )
        y = x.transpose(1, 2).reshape(n, c, *self.grid)  # [N, C, gh, gw]
        if self.mode == "avg":
            # padding=0 + ceil_mode: partial edge windows are divided by their real size only.
            y = F.avg_pool2d(y, kernel_size=self.stride, stride=self.stride, ceil_mode=True)
        else:
            y = F.max_pool2d(y, kernel_size=self.stride, stride=self.stride, ceil_mode=True)
        return y.flatten(2).transpose(1, 2)  # [N, oh * ow, C]

    def extra_repr(self) -> str:
        return f"stride={self.stride}, mode={self.mode}, grid={self.grid}->{self.out_grid}"
