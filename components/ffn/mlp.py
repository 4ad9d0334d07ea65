"""SwiGLU feed-forward block (Shazeer, 2020, "GLU Variants Improve Transformer"), as in Llama and Jamba."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.registry import register


def default_d_ff(d_model: int, multiple_of: int = 64) -> int:
    """8/3 * d_model rounded up to a multiple: the SwiGLU width with a 4x MLP's parameter count."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@register("ffn", "mlp", symbol="-")
class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); parameter names match Llama/Jamba (gate_proj, up_proj, down_proj)."""

    def __init__(
        self, d_model: int, *, layer_idx: int = 0, d_ff: int | None = None, bias: bool = False
    ) -> None:
        super().__init__()
        d_ff = d_ff or default_d_ff(d_model)
        self.layer_idx = layer_idx
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., d_model] -> [..., d_model]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
