"""Fused encoder (Prismatic's DINOv2 + SigLIP): widths add up, grids align, each tower normalises itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.encoders.fused import FusedEncoder
from components.encoders.timm_vit import TimmViT
from toolkit.errors import ChimeraError
from toolkit.registry import build

DINO = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP = "vit_so400m_patch14_siglip_224"
SIGLIP_384 = "vit_so400m_patch14_siglip_384"
TINY = {"depth": 2, "num_heads": 2}
# SigLIP tower: 70 px / patch 14 = 5 x 5, width 32; DINOv2 tower: 40 px / patch 8 = 5 x 5, width 24 (CLS + 4 registers)
SIGLIP_TOWER = {"model_name": SIGLIP, "img_size": 70, "model_args": {**TINY, "embed_dim": 32}}
DINO_TOWER = {"model_name": DINO, "img_size": 40, "model_args": {**TINY, "embed_dim": 24, "patch_size": 8}}


def test_tiny_dino_siglip_concatenates_each_towers_own_features() -> None:
    torch.manual_seed(0)
    enc = FusedEncoder([DINO_TOWER, SIGLIP_TOWER])
    assert enc.grid == (5, 5) and enc.num_tokens == 25 and enc.embed_dim == 24 + 32
    assert enc.image_size == 70  # the largest tower input; the DINOv2 tower gets the image resized to 40
    dino, siglip = enc.towers
    assert isinstance(dino, TimmViT) and dino.num_prefix_tokens == 5 and dino.grid == (5, 5)
    # each tower normalises with its own mean/std (ImageNet for DINOv2, 0.5 for SigLIP)
    assert dino.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert siglip.mean.flatten().tolist() == [0.5, 0.5, 0.5]

    images = torch.rand(2, 3, 70, 70)
    with torch.no_grad():
        out = enc(images)
        small = F.interpolate(images, size=(40, 40), mode="bilinear", align_corners=False, antialias=True)
        expected = torch.cat([dino(small), siglip(images)], dim=-1)
    assert out.shape == (2, 25, 56)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_tower_with_another_grid_is_interpolated_to_the_first_towers_grid() -> None:
    torch.manual_seed(0)
    dino_4x4 = {**DINO_TOWER, "img_size": 32}  # 32 / 8 = 4 x 4
    enc = FusedEncoder([SIGLIP_TOWER, dino_4x4])
    assert enc.grid == (5, 5) and enc.towers[1].grid == (4, 4)
    images = torch.rand(1, 3, 70, 70)
    with torch.no_grad():
        out = enc(images)
        small = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        d = enc.towers[1](small).transpose(1, 2).reshape(1, 24, 4, 4)
        d = F.interpolate(d, size=(5, 5), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[..., :32], enc.towers[0](images), rtol=0, atol=0)
    torch.testing.assert_close(out[..., 32:], d, rtol=0, atol=0)


def test_explicit_image_size_and_gradients_of_an_unfrozen_tower() -> None:
    enc = FusedEncoder([{**SIGLIP_TOWER, "freeze": False}, DINO_TOWER], image_size=84)
    assert enc.image_size == 84 and enc.data_config["input_size"] == (3, 84, 84)
    enc(torch.rand(2, 3, 84, 84)).square().mean().backward()
    trainable = [p for p in enc.towers[0].parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert not any(p.requires_grad for p in enc.towers[1].parameters())  # DINOv2 stays frozen (default)
    assert enc.shard_units() == list(enc.towers[0].model.blocks) + list(enc.towers[1].model.blocks)


def test_prismatic_dinosiglip_224_full_size_on_meta() -> None:
    """Prismatic's dinosiglip-vit-so-224px: both towers 16 x 16 at 224 px, 1024 + 1152 = 2176 channels."""
    with torch.device("meta"):
        enc = FusedEncoder([{"model_name": DINO, "img_size": 224}, {"model_name": SIGLIP}])
    assert enc.grid == (16, 16) and enc.num_tokens == 256 and enc.embed_dim == 2176 and enc.image_size == 224
    assert all(p.is_meta for p in enc.parameters())
    enc.to_empty(device="cpu")
    enc.reset_parameters()
    assert enc.towers[1].mean.flatten().tolist() == [0.5, 0.5, 0.5]
    with torch.device("meta"):  # dinosiglip-vit-so-384px: 27 x 27 each
        enc = FusedEncoder([{"model_name": DINO, "img_size": 384}, {"model_name": SIGLIP_384}])
    assert enc.grid == (27, 27) and enc.embed_dim == 2176 and enc.image_size == 384


def test_built_from_one_config_node_and_tower_errors_named() -> None:
    node = {"name": "fused", "towers": [DINO_TOWER, {"name": "timm_vit", **SIGLIP_TOWER}]}
    enc = build("encoder", node, "model.encoder")
    assert isinstance(enc, FusedEncoder) and enc.embed_dim == 56
    with pytest.raises(ChimeraError, match=r"model.encoder.towers\[1\].selectlayer: unknown argument"):
        build(
            "encoder",
            {"name": "fused", "towers": [DINO_TOWER, {**SIGLIP_TOWER, "selectlayer": -2}]},
            "model.encoder",
        )
    with pytest.raises(ChimeraError, match=r"model.encoder.towers: a non-empty list"):
        build("encoder", {"name": "fused", "towers": []}, "model.encoder")
    with pytest.raises(ChimeraError, match=r"towers\[0\].*keeps prefix"):
        FusedEncoder([{**DINO_TOWER, "drop_prefix_tokens": False}])


def test_pooler_after_a_fused_encoder() -> None:
    enc = FusedEncoder([DINO_TOWER, SIGLIP_TOWER])
    pool = build(
        "pooler", {"name": "pool2d", "stride": 2}, "model.pooler", grid=enc.grid, n_tokens=enc.num_tokens
    )
    with torch.no_grad():
        assert pool(enc(torch.rand(1, 3, 70, 70))).shape == (1, 9, 56)
