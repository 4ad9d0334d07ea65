"""1D pooling over the flattened token sequence: LongLLaVA's 1D-pooling ablation (arXiv 2409.02889).

LongLLaVA compares no pooling (576 tokens), 1D pooling (576 -> 144 with stride 4) and 2D pooling (24 x 24 ->
12 x 12 = 144); 2D wins because 1D windows mix only horizontal neighbours.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.registry import register

MODES = ("avg", "max")


@register("pooler", "pool1d")
class Pool1d(nn.Module):
    """Average (or max) pooling of ``stride`` consecutive tokens: ``[N, L, C] -> [N, ceil(L / stride), C]``.

    Windows do not overlap (kernel = stride). With ceil mode the last window holds ``L % stride`` tokens
    when ``stride`` does not divide ``L`` and averages only those. On a row-major patch grid whose width
    ``stride`` divides, each window lies in one row, so ``out_grid = (gh, gw // stride)``; otherwise None.

    Args:
        grid: encoder patch grid (derived; None when prefix tokens are kept: they are pooled like any token).
        n_tokens: tokens per image from the encoder (derived).
        stride: tokens per window (4 gives LongLLaVA's 576 -> 144).
        mode: ``avg`` or ``max``.
    """

    def __init__(
        self, *, grid: tuple[int, int] | None = None, n_tokens: int, stride: int = 4, mode: str = "avg"
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"pool1d mode '{mode}' is not supported; allowed modes: {', '.join(MODES)}")
        if int(stride) < 1:
            raise ValueError(f"pool1d stride must be >= 1, got {stride}")
        self.stride = int(stride)
        self.mode = mode
        self.n_tokens = int(n_tokens)
        self.num_tokens: int = math.ceil(self.n_tokens / self.stride)
        if grid is not None and grid[1] % self.stride == 0:
            self.out_grid: tuple[int, int] | None = (int(grid[0]), int(grid[1]) // self.stride)
        else:
            self.out_grid = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, n_tokens, C]`` -> ``[N, num_tokens, C]``."""
        if x.shape[1] != self.n_tokens:
            raise ValueError(f"pool1d expects {self.n_tokens} tokens per image, got {x.shape[1]}")
        y = x.transpose(1, 2)  # [N, C, L]
        if self.mode == "avg":
            # padding=0 + ceil_mode: the partial last window is divided by its real length only.
            y = F.avg_pool1d(y, kernel_size=self.stride, stride=self.stride, ceil_mode=True)
        else:
            y = F.max_pool1d(y, kernel_size=self.stride, stride=self.stride, ceil_mode=True)
        return y.transpose(1, 2)  # [N, ceil(L / stride), C]

    def extra_repr(self) -> str:
        return f"stride={self.stride}, mode={self.mode}, tokens={self.n_tokens}->{self.num_tokens}"
