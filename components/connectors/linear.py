"""Linear connector: LLaVA 1.0's projector (Liu et al., "Visual Instruction Tuning", arXiv 2304.08485).

Reference: haotian-liu/LLaVA ``llava/model/multimodal_projector/builder.py`` (``mm_projector_type: linear``).
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.registry import register


@register("connector", "linear")
class LinearConnector(nn.Module):
    """One linear map ``[..., in_dim] -> [..., out_dim]`` (LLaVA 1.0).

    Parameter names: ``proj.weight [out_dim, in_dim]``, ``proj.bias [out_dim]``; LLaVA's
    ``model.mm_projector.{weight,bias}`` map to ``proj.{weight,bias}``.

    Args:
        in_dim: encoder width (derived).
        out_dim: decoder width (derived).
        bias: add a bias.
    """

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.proj = nn.Linear(self.in_dim, self.out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in_dim]`` -> ``[..., out_dim]``."""
        return self.proj(x)
