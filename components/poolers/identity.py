"""Identity pooler: every encoder token reaches the connector (LLaVA 1.5, arXiv 2310.03744: 576 tokens)."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.registry import register


@register("pooler", "identity")
class IdentityPooler(nn.Module):
    """No pooling: ``[N, n_tokens, C] -> [N, n_tokens, C]`` (LLaVA 1.5 keeps all 24 x 24 = 576 tokens).

    ``grid`` and ``n_tokens`` are derived by Chimera from the encoder; ``out_grid`` is the input grid.
    """

    def __init__(self, *, grid: tuple[int, int] | None = None, n_tokens: int) -> None:
        super().__init__()
        self.out_grid: tuple[int, int] | None = tuple(grid) if grid is not None else None
        self.num_tokens: int = int(n_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, n_tokens, C]`` -> ``[N, n_tokens, C]`` (the same tensor)."""
        return x
