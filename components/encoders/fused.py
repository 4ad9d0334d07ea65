"""Fused vision encoder: several towers on the same image, patch features concatenated on channels.

Prismatic VLMs (Karamcheti et al., "Prismatic VLMs: Investigating the Design Space of Visually-Conditioned
Language Models", ICML 2024, arXiv 2402.07865) fuse DINOv2 and SigLIP: both ViT-L/so400m towers at 224 px with
patch 14 give the same 16 x 16 grid, and the projector sees ``1024 + 1152 = 2176`` channels per patch.
Reference: TRI-ML/prismatic-vlms ``prismatic/models/backbones/vision/dinosiglip_vit.py`` (each tower has
its own image transform and normalisation; features are ``torch.cat([dino, siglip], dim=2)``).

One config node::

    encoder:
      name: fused
      towers:
        - {model_name: vit_large_patch14_reg4_dinov2.lvd142m, img_size: 224}
        - {model_name: vit_so400m_patch14_siglip_224}

Each tower is a registered encoder (``name:`` defaults to ``timm_vit``, so every ``TimmViT`` argument works:
``select_layer``, ``checkpoint_path``, ``freeze``...), validated like any config node. Grids are aligned
in two steps: the common input (``image_size``, default the largest tower's) is resized per tower to that
tower's own ``image_size`` (bilinear with antialias, values stay in [0, 1]; each tower then normalises with
its own mean/std), and a tower whose patch grid still differs from the first tower's has its feature map
resized to the first tower's grid (bilinear). Give towers matching ``img_size`` / patch sizes to avoid the
second step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.encoders.preprocess import Mode, make_transform
from toolkit.errors import ChimeraError
from toolkit.registry import build, register, validate


@register("encoder", "fused")
class FusedEncoder(nn.Module):
    """Several vision towers, features concatenated on channels: ``[N, 3, S, S] -> [N, gh * gw, sum(C_i)]``.

    ``grid`` is the first tower's patch grid, ``embed_dim`` the sum of the towers' widths, ``image_size``
    the common input side ``S``. ``data_config`` is the first tower's with ``input_size`` ``(3, S, S)``
    (interpolation and the letterbox colour of ``transform('pad')``).

    Args:
        towers: one config node per tower (``{name: timm_vit, model_name: ..., img_size: ...}``; ``name``
            may be omitted). Every tower must keep a patch grid (``drop_prefix_tokens: true``, the default).
        image_size: common input side; None: the largest tower input.
    """

    def __init__(self, towers: list[dict], *, image_size: int | None = None) -> None:
        super().__init__()
        if not towers:
            raise ChimeraError("encoder fused needs at least one tower in towers: [...]")
        built = [build("encoder", _node(t), f"towers[{i}]") for i, t in enumerate(towers)]
        for i, tower in enumerate(built):
            if tower.grid is None:
                raise ChimeraError(
                    f"towers[{i}]: a fused encoder concatenates patch grids, but this tower keeps prefix "
                    "(CLS/register) tokens and has no grid; remove drop_prefix_tokens: false"
                )
        self.towers = nn.ModuleList(built)
        self.grid: tuple[int, int] | None = tuple(built[0].grid)
        self.num_tokens: int = self.grid[0] * self.grid[1]
        self.embed_dim: int = sum(int(t.embed_dim) for t in built)
        self.image_size: int = (
            int(image_size) if image_size is not None else max(int(t.image_size) for t in built)
        )
        if self.image_size < 1:
            raise ValueError(f"fused image_size must be >= 1, got {image_size}")
        data_config = dict(getattr(built[0], "data_config", {}) or {})
        data_config["input_size"] = (3, self.image_size, self.image_size)
        self.data_config: dict[str, Any] = data_config

    @staticmethod
    def validate_config(kwargs: Mapping[str, Any], where: str) -> None:
        """Config-time check of every tower node (unknown keys, types), naming ``...towers[i].key``."""
        towers = kwargs.get("towers")
        if not isinstance(towers, list) or not towers:
            raise ChimeraError(
                f"{where}.towers: a non-empty list of encoder nodes is required", key=f"{where}.towers"
            )
        for i, tower in enumerate(towers):
            if not isinstance(tower, Mapping):
                raise ChimeraError(
                    f"{where}.towers[{i}]: expected a mapping such as {{model_name: ...}}, got {tower!r:.60}",
                    key=f"{where}.towers[{i}]",
                )
            validate("encoder", _node(tower), f"{where}.towers[{i}]")

    def reset_parameters(self) -> None:
        """Refill every tower's normalisation buffers (after ``to_empty`` on a meta-built encoder)."""
        for tower in self.towers:
            reset = getattr(tower, "reset_parameters", None)
            if reset is not None:
                reset()

    def shard_units(self) -> list[nn.Module]:
        """Every tower's FSDP wrap units (its ViT blocks)."""
        units: list[nn.Module] = []
        for tower in self.towers:
            units += list(tower.shard_units()) if hasattr(tower, "shard_units") else [tower]
        return units

    def transform(self, mode: Mode = "pad") -> Callable[[Any], torch.Tensor]:
        """PIL image -> ``[3, image_size, image_size]`` in [0, 1] (see ``components/encoders/preprocess.py``)."""
        return make_transform(self.data_config, mode)

    def preprocess(self, image: Any, mode: Mode = "pad") -> torch.Tensor:
        """One PIL image -> ``[3, image_size, image_size]`` in [0, 1]."""
        return self.transform(mode)(image)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[N, 3, S, S]`` in [0, 1] -> features ``[N, gh * gw, sum of tower widths]``."""
        feats = []
        for tower in self.towers:
            x = images
            if x.shape[-1] != tower.image_size or x.shape[-2] != tower.image_size:
                size = (tower.image_size, tower.image_size)
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            f = tower(x)  # [N, gh_i * gw_i, C_i]
            if tuple(tower.grid) != self.grid:
                n, _, c = f.shape
                f = f.transpose(1, 2).reshape(n, c, *tower.grid)  # [N, C_i, gh_i, gw_i]
                f = F.interpolate(f, size=self.grid, mode="bilinear", align_corners=False)
                f = f.flatten(2).transpose(1, 2)  # [N, gh * gw, C_i]
            feats.append(f)
        return torch.cat(feats, dim=-1)  # [N, gh * gw, sum C_i]

    def extra_repr(self) -> str:
        return f"towers={len(self.towers)}, image_size={self.image_size}, grid={self.grid}, embed_dim={self.embed_dim}"


def _node(tower: Mapping[str, Any]) -> dict[str, Any]:
    """A tower node with ``name`` defaulting to ``timm_vit``."""
    node = dict(tower)
    node.setdefault("name", "timm_vit")
    return node
