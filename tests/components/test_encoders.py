"""timm_vit encoder: shapes, LLaVA's select_layer semantics, pruning, freezing, meta builds, real weights."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from components.encoders.timm_vit import TimmViT
from toolkit.errors import ChimeraError
from toolkit.registry import build

CLIP = "vit_large_patch14_clip_336.openai"
SIGLIP = "vit_so400m_patch14_siglip_384"
TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}
# name, img_size, expected grid, prefix tokens, extra model_args
STYLES = {
    "clip": (CLIP, 56, (4, 4), 1, {"act_layer": "quick_gelu"}),  # OpenAI CLIP: CLS token, QuickGELU
    "siglip": (SIGLIP, 70, (5, 5), 0, {}),  # SigLIP: no CLS, MAP head (pruned), odd grid
}


def tiny(style: str, **kwargs) -> TimmViT:
    name, img_size, _, _, extra = STYLES[style]
    return TimmViT(name, img_size=img_size, model_args={**TINY, **extra}, **kwargs)


def reference_timm(style: str, seed: int = 0) -> nn.Module:
    """The un-pruned timm model with the same architecture as ``tiny(style)``."""
    name, img_size, _, _, extra = STYLES[style]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **TINY, **extra).eval()


def hf_hidden_states(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Hugging Face-style ``hidden_states`` computed by hand: embeddings, then the output of every block."""
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = model.patch_embed((images - mean) / std)
    x = model.norm_pre(model._pos_embed(x))
    states = [x]
    for block in model.blocks:
        x = block(x)
        states.append(x)
    return states


@pytest.mark.parametrize("style", sorted(STYLES))
def test_tiny_encoder_shapes(style: str) -> None:
    _, img_size, grid, prefix, _ = STYLES[style]
    enc = tiny(style)
    assert enc.grid == grid and enc.embed_dim == 32 and enc.image_size == img_size
    assert enc.num_tokens == grid[0] * grid[1]
    assert enc.num_prefix_tokens == prefix
    out = enc(torch.rand(3, 3, img_size, img_size))
    assert out.shape == (3, grid[0] * grid[1], 32)
    assert torch.isfinite(out).all()

    kept = tiny(style, drop_prefix_tokens=False)
    assert kept.grid is None and kept.num_tokens == grid[0] * grid[1] + prefix
    assert kept(torch.rand(1, 3, img_size, img_size)).shape == (1, kept.num_tokens, 32)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_normalisation_uses_pretrained_cfg_as_non_persistent_buffers(style: str) -> None:
    enc = tiny(style)
    cfg = timm.get_pretrained_cfg(STYLES[style][0])
    assert torch.allclose(enc.mean.flatten(), torch.tensor(cfg.mean))
    assert torch.allclose(enc.std.flatten(), torch.tensor(cfg.std))
    assert "mean" in dict(enc.named_buffers()) and "mean" not in enc.state_dict()
    assert enc.data_config["input_size"] == (3, STYLES[style][1], STYLES[style][1])
    # a meta-built encoder gets its buffers back after to_empty + reset_parameters (FSDP materialisation)
    name, img_size, _, _, extra = STYLES[style]
    with torch.device("meta"):
        meta = TimmViT(name, img_size=img_size, model_args={**TINY, **extra})
    assert meta.mean.is_meta
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    torch.testing.assert_close(meta.mean, enc.mean)
    torch.testing.assert_close(meta.std, enc.std)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_select_layer_minus_2_is_output_of_second_to_last_block(style: str) -> None:
    """LLaVA's hidden_states[-2]: the un-pruned timm model's blocks run by hand, same weights."""
    _, img_size, _, prefix, _ = STYLES[style]
    ref = reference_timm(style)
    images = torch.rand(2, 3, img_size, img_size)
    with torch.no_grad():
        states = hf_hidden_states(ref, images)  # len = depth + 1
    assert len(states) == TINY["depth"] + 1

    for select_layer, hf_index in [(-2, -2), (-1, -1), (0, 1), (1, 2)]:
        enc = tiny(style, select_layer=select_layer)
        missing, _ = enc.model.load_state_dict(ref.state_dict(), strict=False)
        assert missing == []
        with torch.no_grad():
            out = enc(images)
        expected = states[hf_index][:, prefix:]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # the neighbouring layer differs, so a wrong index cannot pass
        assert not torch.allclose(out, states[hf_index - 1][:, prefix:], atol=1e-3)

    kept = tiny(style, drop_prefix_tokens=False)
    kept.model.load_state_dict(ref.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(kept(images), states[-2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_blocks_after_select_layer_head_and_norm_are_pruned(style: str) -> None:
    ref = reference_timm(style)
    enc = tiny(style, select_layer=-2)
    assert len(enc.model.blocks) == TINY["depth"] - 1 < len(ref.blocks)
    assert isinstance(enc.model.norm, nn.Identity) and isinstance(enc.model.head, nn.Identity)
    assert getattr(enc.model, "attn_pool", None) is None  # SigLIP's MAP head is gone too
    assert enc.shard_units() == list(enc.model.blocks)
    n_enc = sum(p.numel() for p in enc.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    n_block = sum(p.numel() for p in ref.blocks[-1].parameters())
    assert n_enc <= n_ref - n_block
    assert len(tiny(style, select_layer=0).model.blocks) == 1


def test_frozen_encoder_has_no_trainable_params_and_stays_in_eval() -> None:
    enc = tiny("clip")
    parent = nn.Sequential(enc, nn.Linear(32, 8))
    parent.train()
    assert parent.training and parent[1].training
    assert not any(p.requires_grad for p in enc.parameters())
    assert not any(m.training for m in enc.modules())

    free = tiny("clip", freeze=False)
    parent = nn.Sequential(free).train()
    assert free.training and all(m.training for m in free.modules())
    assert all(p.requires_grad for p in free.parameters())
    free(torch.rand(2, 3, 56, 56)).square().mean().backward()
    assert all(p.grad is not None for p in free.parameters())


def test_full_size_clip_l14_336_on_meta_has_290_909_184_params() -> None:
    """LLaVA 1.5's tower: 24x24 grid, width 1024; 23 of 24 blocks kept (select_layer -2), no final norm."""
    with torch.device("meta"):
        enc = TimmViT(CLIP)
        full = timm.create_model(CLIP, pretrained=False, num_classes=0)
    assert all(p.is_meta for p in enc.parameters())
    assert enc.grid == (24, 24) and enc.embed_dim == 1024 and enc.num_tokens == 576 and enc.image_size == 336
    assert len(enc.model.blocks) == 23
    n = sum(p.numel() for p in enc.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    assert n_full == 303_507_456  # timm's CLIP ViT-L/14-336 image tower without the 768-d projection
    assert n == n_full - sum(p.numel() for p in full.blocks[-1].parameters()) - sum(
        p.numel() for p in full.norm.parameters()
    )
    assert n == 290_909_184


def test_full_size_siglip_so400m_on_meta_has_397_745_440_params() -> None:
    with torch.device("meta"):
        enc = TimmViT(SIGLIP)
    assert enc.grid == (27, 27) and enc.embed_dim == 1152 and enc.num_tokens == 729 and enc.image_size == 384
    assert len(enc.model.blocks) == 26
    assert sum(p.numel() for p in enc.parameters()) == 397_745_440


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_path_loads_real_weights(tmp_path, suffix: str) -> None:
    ref = reference_timm("clip", seed=0)
    path = tmp_path / f"tower{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    images = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        expected = hf_hidden_states(ref, images)[-2][:, 1:]

    torch.manual_seed(1)  # a different random init: only the checkpoint can make the outputs equal
    loaded = tiny("clip", checkpoint_path=str(path))
    torch.manual_seed(1)
    random_init = tiny("clip")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(random_init(images), expected, atol=1e-3)


def test_checkpoint_path_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ChimeraError, match="nope.safetensors"):
        tiny("clip", checkpoint_path=str(missing))
    # weights of another architecture (deeper) must not load silently
    wrong = tmp_path / "deeper.pth"
    deeper = timm.create_model(CLIP, pretrained=False, num_classes=0, img_size=56, **{**TINY, "depth": 5})
    torch.save(deeper.state_dict(), wrong)
    with pytest.raises(ChimeraError, match="deeper.pth"):
        tiny("clip", checkpoint_path=str(wrong))


def test_user_errors() -> None:
    with pytest.raises(ChimeraError, match="vit_large_patch14_clip_336"):
        TimmViT("vit_large_patch14_clip_33")
    with pytest.raises(ChimeraError, match="openai"):
        TimmViT("vit_large_patch14_clip_336.opnai")
    with pytest.raises(ChimeraError, match="select_layer 4 is out of range"):
        tiny("clip", select_layer=4)
    with pytest.raises(ChimeraError, match="img_size"):
        TimmViT(CLIP, model_args={**TINY, "img_size": 56})


def test_registered_and_built_from_config_node() -> None:
    node = {"name": "timm_vit", "model_name": SIGLIP, "img_size": 28, "select_layer": -1, "model_args": TINY}
    enc = build("encoder", node, "model.encoder")
    assert isinstance(enc, TimmViT) and enc.grid == (2, 2) and len(enc.model.blocks) == 4


def test_siglip_weights_file_gives_exactly_timms_own_features(tmp_path) -> None:
    """A SigLIP-architecture checkpoint (vit_so400m_patch14_siglip_384 with tiny model_args) saved with
    safetensors and loaded through checkpoint_path gives timm's own forward_intermediates, bit for bit."""
    name, img_size, grid, _, extra = STYLES["siglip"]
    torch.manual_seed(3)
    ref = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **TINY, **extra).eval()
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))

    torch.manual_seed(4)  # another random init underneath: only the file can make the features equal
    enc = TimmViT(
        name, img_size=img_size, checkpoint_path=str(path), select_layer=-2, model_args={**TINY, **extra}
    )
    images = torch.rand(2, 3, img_size, img_size)
    cfg = ref.pretrained_cfg
    normalised = (images - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = ref.forward_intermediates(
            normalised, indices=[TINY["depth"] - 2], norm=False, output_fmt="NLC", intermediates_only=True
        )[0]
        out = enc(images)
    assert expected.shape == (2, grid[0] * grid[1], TINY["embed_dim"])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(out, expected)  # same ops in the same order: bit for bit
    assert enc.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # SigLIP's own normalisation, inside the encoder
