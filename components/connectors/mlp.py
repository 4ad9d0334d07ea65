"""MLP connector: LLaVA 1.5's ``mlp2x_gelu`` projector (Liu et al., arXiv 2310.03744), also LongLLaVA's.

Reference: haotian-liu/LLaVA ``llava/model/multimodal_projector/builder.py``: ``mlp{depth}x_gelu`` is
``Linear(in, out)`` followed by ``depth - 1`` times ``GELU, Linear(out, out)``.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.registry import register

ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
}


@register("connector", "mlp")
class MLPConnector(nn.Module):
    """``depth`` linear layers with an activation between them: ``[..., in_dim] -> [..., out_dim]``.

    ::

        depth 2 (mlp2x_gelu):  x -> Linear(in, h) -> GELU -> Linear(h, out)
        depth 3:               x -> Linear(in, h) -> GELU -> Linear(h, h) -> GELU -> Linear(h, out)

    ``h = hidden_dim or out_dim``, so the default is exactly LLaVA's ``mlp{depth}x_gelu``. The layers sit in
    the Sequential ``proj``: parameter names are ``proj.0.weight``, ``proj.2.weight``, ``proj.4.weight``...,
    the same indices as LLaVA's ``model.mm_projector.0.weight``... (map the prefix ``mm_projector.`` to
    ``proj.``).

    Args:
        in_dim: encoder width (derived).
        out_dim: decoder width (derived).
        depth: number of linear layers (>= 1; 1 is a linear projector).
        hidden_dim: width between layers (None: out_dim, as LLaVA).
        act: activation between layers: gelu, gelu_tanh, relu or silu.
        bias: biases on every linear layer.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        depth: int = 2,
        hidden_dim: int | None = None,
        act: str = "gelu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if int(depth) < 1:
            raise ValueError(f"mlp depth must be >= 1, got {depth}")
        if act not in ACTIVATIONS:
            raise ValueError(f"mlp act '{act}' is not supported; allowed: {', '.join(ACTIVATIONS)}")
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.depth = int(depth)
        hidden = int(hidden_dim) if hidden_dim is not None else self.out_dim
        widths = [self.in_dim] + [hidden] * (self.depth - 1) + [self.out_dim]
        layers: list[nn.Module] = []
        for i in range(self.depth):
            if i > 0:
                layers.append(ACTIVATIONS[act]())
            layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in_dim]`` -> ``[..., out_dim]``."""
        return self.proj(x)
