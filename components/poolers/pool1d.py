"""1D pooling over the flattened token sequence: LongLLaVA's 1D-pooling ablation (arXiv 2409.02889).

LongLLaVA compares no pooling (576 tokens), 1D pooling (576 -> 144) and 2D pooling (24 x 24 -> 12 x 12 = 144);
2D wins because 1D windows mix only horizontal neighbours. Its code (FreedomIntelligence/LongLLaVA
``llava/model/multimodal_encoder/clip_encoder.py``, ``resamplePooling``) resizes the sequence with
``F.interpolate(..., size=(144,), mode="linear", align_corners=False)``: ``{target: 144, mode: linear}`` here.
Downscaling by 4 that way blends tokens ``4i + 1`` and ``4i + 2`` only; ``avg`` averages all four.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.registry import register

MODES = ("avg", "max", "linear")


@register("pooler", "pool1d")
class Pool1d(nn.Module):
    """Average / max pooling or linear resizing of the token sequence: ``[N, L, C] -> [N, L', C]``.

    With ``stride`` (default 4): ``L' = ceil(L / stride)``; windows do not
    overlap (kernel = stride) and with ceil mode the last window holds ``L % stride`` tokens when ``stride``
    does not divide ``L`` and averages only those. A stride larger than ``L`` is an error (it would leave one
    token per image; ask for that with ``target: 1``). With ``target``: ``L' = target`` by adaptive pooling
    (windows ``[floor(i L / L'), ceil((i + 1) L / L'))``, overlapping by one token when ``L'`` does not
    divide ``L``; exactly the stride ``L / L'`` windows when it does). ``linear`` resizes to ``L'`` either
    way (``F.interpolate``, ``align_corners=False``: output i samples position ``(i + 0.5) L / L' - 0.5``).

    On a row-major patch grid whose width the effective stride divides, each window lies in one row, so
    ``out_grid = (gh, gw // stride)``; otherwise None.

    Args:
        grid: encoder patch grid (derived; None when prefix tokens are kept: they are pooled like any token).
        n_tokens: tokens per image from the encoder (derived).
        stride: tokens per window (4 gives LongLLaVA's 576 -> 144); unused when ``target`` is given (setting
            both to other values is an error).
        target: output tokens per image (1..n_tokens); replaces ``stride``.
        mode: ``avg``, ``max`` or ``linear`` (LongLLaVA's 1D resampling).
    """

    def __init__(
        self,
        *,
        grid: tuple[int, int] | None = None,
        n_tokens: int,
        stride: int = 4,
        target: int | None = None,
        mode: str = "avg",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"pool1d mode '{mode}' is not supported; allowed modes: {', '.join(MODES)}")
        if target is not None and stride != 4:
            raise ValueError(
                f"pool1d takes stride or target, not both (got stride {stride}, target {target})"
            )
        self.mode = mode
        self.n_tokens = int(n_tokens)
        self.target = None if target is None else int(target)
        if self.target is None:
            self.stride: int | None = int(stride)
            if self.stride < 1:
                raise ValueError(f"pool1d stride must be >= 1, got {stride}")
            if self.stride > self.n_tokens:
                raise ValueError(
                    f"pool1d stride {self.stride} is larger than the {self.n_tokens} tokens per image (a window "
                    f"must fit: stride 1..{self.n_tokens}); use a smaller stride (target: 1 for one token)"
                )
            self.num_tokens: int = math.ceil(self.n_tokens / self.stride)
            step = self.stride
        else:
            if not 1 <= self.target <= self.n_tokens:
                raise ValueError(
                    f"pool1d target must be 1..{self.n_tokens} (the tokens per image), got {self.target}"
                )
            self.stride = None
            self.num_tokens = self.target
            step = self.n_tokens // self.target if self.n_tokens % self.target == 0 else 0
        if grid is not None and step and grid[1] % step == 0:
            self.out_grid: tuple[int, int] | None = (int(grid[0]), int(grid[1]) // step)
        else:
            self.out_grid = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, n_tokens, C]`` -> ``[N, num_tokens, C]``."""
        if x.shape[1] != self.n_tokens:
            raise ValueError(f"pool1d expects {self.n_tokens} tokens per image, got {x.shape[1]}")
        y = x.transpose(1, 2)  # [N, C, L]
        if self.mode == "linear":
            y = F.interpolate(y, size=self.num_tokens, mode="linear", align_corners=False)
        elif self.stride is not None:
            # padding=0 + ceil_mode: the partial last window is divided by its real length only.
            pool = F.avg_pool1d if self.mode == "avg" else F.max_pool1d
            y = pool(y, kernel_size=self.stride, stride=self.stride, ceil_mode=True)
        elif self.mode == "avg":
            y = F.adaptive_avg_pool1d(y, self.target)
        else:
            y = F.adaptive_max_pool1d(y, self.target)
        return y.transpose(1, 2)  # [N, num_tokens, C]

    def extra_repr(self) -> str:
        how = f"stride={self.stride}" if self.stride is not None else f"target={self.target}"
        return f"{how}, mode={self.mode}, tokens={self.n_tokens}->{self.num_tokens}"
