"""C-Abstractor: Honeybee's locality-preserving projector (Cha et al., "Honeybee: Locality-enhanced Projector
for Multimodal LLM", CVPR 2024, arXiv 2312.06742).

The C-Abstractor reduces the visual tokens itself, so it replaces a pooler: ``L`` ResNet blocks on the patch
grid, adaptive average pooling to an ``M``-token grid, ``L`` more ResNet blocks, then an MLP readout. The
paper's blocks are RegNet bottlenecks (timm's ``RegStage`` with SiLU and LayerNorm2d); the defaults are
Honeybee's ``configs/model_config/c-abs.yaml``: depth 3, mlp_depth 2, 144 queries, learned positional
embedding, no prenorm, hidden width 1024 (the CLIP ViT-L width: here ``hidden_dim`` defaults to ``in_dim``).

Reference code: kakaobrain/honeybee ``honeybee/projectors/projectors.py`` (``CAbstractor``,
``ConvProjector``, ``Projector``, ``build_mlp``). Parameter names match Honeybee's ``abstractor.*``
(``pos_emb``, ``net.0.b1.conv1.conv.weight``, ``net.2...``, ``readout.0.weight``...), so its weights load
with the prefix ``abstractor.`` removed. Honeybee's optional trailing ``eos_tokens`` (0 in its configs) are
not implemented.

Parameters (``C`` = in_dim, ``H`` = hidden_dim, ``D`` = out_dim, ``P`` = input tokens, ``r(c) = round(c / 4)``),
one bottleneck ``B(c_in, c) = c_in c + 2c`` (1x1 conv + LN) ``+ 9c + 2c`` (3x3 depthwise + LN)
``+ 2 c r(c_in) + r(c_in) + c`` (squeeze-excite) ``+ c^2 + 2c`` (1x1 conv + LN) ``+ [c_in != c] (c_in c + 2c)``
(1x1 shortcut + LN)::

    params = P C [pos_emb] + 2 C [prenorm] + B(C, H) + (L - 1) B(H, H) + L B(H, H)
             + H D + D + (mlp_depth - 1)(D^2 + D)

Data flow::

    [N, P, C] -(+pos_emb)-> [N, C, gh, gw] -> RegStage(L, C->H) -> AdaptiveAvgPool(oh, ow)
              -> RegStage(L, H->H) -> [N, oh * ow, H] -> Linear(H, D) (-> SiLU -> Linear(D, D)) x (mlp_depth-1)
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import LayerNorm, LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn

from components.poolers._grid import target_grid
from toolkit.errors import ChimeraError
from toolkit.registry import register


@register("connector", "c_abstractor")
class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: ResNet blocks, adaptive average pooling to ``num_queries`` tokens, ResNet
    blocks, MLP: ``[N, gh * gw, in_dim] -> [N, num_tokens, out_dim]``.

    It reduces tokens, so it tells the model how many it produces: ``num_tokens`` (``oh * ow``) and
    ``out_grid`` (``(oh, ow)``). Use it with the ``identity`` pooler (Honeybee pools nothing before it).

    Args:
        in_dim: width of the incoming tokens (derived).
        out_dim: decoder width (derived).
        grid: patch grid ``(gh, gw)`` of the incoming tokens (derived: the pooler's ``out_grid``; None when
            the encoder keeps prefix tokens, which is an error here).
        num_queries: output tokens: a count keeping the grid's aspect ratio (a perfect square on a square
            grid, as Honeybee requires) or ``[rows, cols]``. 144 = 12 x 12 (Honeybee's default).
        hidden_dim: width of the ResNet stages (None: ``in_dim``; Honeybee uses 1024 = CLIP ViT-L's width).
        depth: bottleneck blocks in each of the two stages (0: adaptive pooling + MLP only, as Honeybee).
        mlp_depth: linear layers of the readout MLP (SiLU between them).
        pos_emb: add a learned positional embedding ``[1, gh * gw, in_dim]`` (truncated normal, std 0.02).
        prenorm: LayerNorm on the incoming tokens first.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        grid: tuple[int, int] | None = None,
        num_queries: int | tuple[int, int] = 144,
        hidden_dim: int | None = None,
        depth: int = 3,
        mlp_depth: int = 2,
        pos_emb: bool = True,
        prenorm: bool = False,
    ) -> None:
        super().__init__()
        if grid is None:
            raise ChimeraError(
                "connector c_abstractor needs the patch grid of its input tokens (derived from the pooler's "
                "out_grid), but none was given: the encoder keeps prefix (CLS/register) tokens (set "
                "drop_prefix_tokens: true) or the pooler does not keep a grid (use identity or pool2d)"
            )
        if int(depth) < 0:
            raise ValueError(f"c_abstractor depth must be >= 0, got {depth}")
        if int(mlp_depth) < 1:
            raise ValueError(f"c_abstractor mlp_depth must be >= 1, got {mlp_depth}")
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.out_grid: tuple[int, int] = target_grid("c_abstractor num_queries", self.grid, num_queries)
        self.num_tokens: int = self.out_grid[0] * self.out_grid[1]
        self.hidden_dim = self.in_dim if hidden_dim is None else int(hidden_dim)
        self.depth, self.mlp_depth = int(depth), int(mlp_depth)
        n_in = self.grid[0] * self.grid[1]

        self.prenorm = LayerNorm(self.in_dim) if prenorm else None
        if pos_emb:
            self.pos_emb: nn.Parameter | None = nn.Parameter(torch.zeros(1, n_in, self.in_dim))
            nn.init.trunc_normal_(self.pos_emb, mean=0.0, std=0.02)
        else:
            self.pos_emb = None

        stage = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
        sampler = nn.AdaptiveAvgPool2d(self.out_grid)
        if self.depth:
            s1 = stage(self.depth, self.in_dim, self.hidden_dim)
            s2 = stage(self.depth, self.hidden_dim, self.hidden_dim)
            self.net = nn.Sequential(s1, sampler, s2)
            readout_in = self.hidden_dim
        else:
            self.net = nn.Sequential(sampler)
            readout_in = self.in_dim
        layers: list[nn.Module] = [nn.Linear(readout_in, self.out_dim)]
        for _ in range(1, self.mlp_depth):
            layers += [nn.SiLU(), nn.Linear(self.out_dim, self.out_dim)]
        self.readout = nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        """This module's own parameter (its blocks and readout reset themselves): ``pos_emb`` ~ truncated
        N(0, 0.02), as built. Lets ``toolkit.init`` initialise a meta-device build."""
        if self.pos_emb is not None:
            nn.init.trunc_normal_(self.pos_emb, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, gh * gw, in_dim]`` -> ``[N, oh * ow, out_dim]``."""
        n, length, c = x.shape
        if length != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"c_abstractor expects {self.grid[0] * self.grid[1]} tokens per image (grid {self.grid}), "
                f"got {length}"
            )
        if self.prenorm is not None:
            x = self.prenorm(x)
        if self.pos_emb is not None:
            x = x + self.pos_emb  # [N, P, C]
        y = x.transpose(1, 2).reshape(n, c, *self.grid)  # [N, C, gh, gw]
        y = self.net(y)  # [N, H, oh, ow]
        y = y.flatten(2).transpose(1, 2)  # [N, oh * ow, H]
        return self.readout(y)  # [N, oh * ow, out_dim]

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid}->{self.out_grid}, tokens={self.num_tokens}, width {self.in_dim}->"
            f"{self.hidden_dim}->{self.out_dim}, depth={self.depth}, mlp_depth={self.mlp_depth}"
        )
