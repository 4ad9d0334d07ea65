"""SwiGLU feed-forward block (Shazeer, 2020, "GLU Variants Improve Transformer"), as in Llama and Jamba."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components import cpu_kernels
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
        """x: [..., d_model] -> [..., d_model]. Functional calls (no module-call overhead, which at one decoding
        token costs as much as the arithmetic); in place where no autograd graph is built."""
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        h, u = F.linear(x, gate.weight, gate.bias), F.linear(x, up.weight, up.bias)
        h = F.silu(h) * u if torch.is_grad_enabled() else F.silu(h, inplace=True).mul_(u)
        return F.linear(h, down.weight, down.bias)

    def residual_step(self, norm: nn.Module, x: Tensor) -> Tensor | None:
        """``x + self(norm(x))`` for a few rows on a CPU (decoding) in one numba call (``cpu_kernels``); None
        where that does not apply (``DecoderLayer`` then runs the norm, ``forward`` and the sum), including for a
        subclass that overrides ``forward``: the kernel computes this class's math."""
        if type(self).forward is not SwiGLU.forward:
            return None
        return cpu_kernels.swiglu_residual_step(self, norm, x)
