"""Preprocessing from an encoder's timm data config: letterbox bands, crop and resize sizes, interpolation."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import functional as TF

from components.encoders.preprocess import letterbox, make_transform
from components.encoders.timm_vit import TimmViT

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
RED = (255, 0, 0)


def config(size: int, interpolation: str = "bicubic", crop_pct: float = 1.0, mean=CLIP_MEAN) -> dict:
    return {"input_size": (3, size, size), "interpolation": interpolation, "mean": mean, "crop_pct": crop_pct}


def fill_of(mean) -> torch.Tensor:
    """LLaVA's letterbox colour: int(255 * mean) per channel (122, 116, 104 for CLIP), as a [3, 1] column."""
    return torch.tensor([int(255 * m) for m in mean], dtype=torch.float32).view(3, 1) / 255


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def test_pad_on_a_wide_image_gives_mean_coloured_bands_above_and_below() -> None:
    """200 x 100 red image -> 200 x 200 canvas: rows 0-49 and 150-199 are the mean colour."""
    out = make_transform(config(200), "pad")(Image.new("RGB", (200, 100), RED))
    assert out.shape == (3, 200, 200) and out.dtype == torch.float32
    fill = fill_of(CLIP_MEAN)
    assert [int(v * 255 + 0.5) for v in fill.flatten()] == [122, 116, 104]
    for rows in (slice(0, 50), slice(150, 200)):
        assert torch.equal(out[:, rows].flatten(1), fill.expand(3, 50 * 200)), rows
    assert torch.equal(out[:, 50:150], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 100, 200))


def test_pad_then_resize_keeps_bands_in_proportion() -> None:
    """300 x 100 -> 300 x 300 canvas (bands of 100) -> 150 x 150: bands of 50 rows (edges blur over ~2 rows)."""
    out = make_transform(config(150), "pad")(Image.new("RGB", (300, 100), RED))
    assert out.shape == (3, 150, 150)
    fill = fill_of(CLIP_MEAN).view(3, 1, 1)
    assert torch.allclose(out[:, :48], fill.expand(3, 48, 150), atol=1 / 255)
    assert torch.allclose(out[:, 103:], fill.expand(3, 47, 150), atol=1 / 255)
    assert torch.allclose(
        out[:, 53:97], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 44, 150), atol=1 / 255
    )


def test_letterbox_offsets_as_llava_expand2square() -> None:
    """Offset (long - short) // 2: a 201 x 100 image gets 50 rows above and 51 below; tall images get columns."""
    canvas = letterbox(Image.new("RGB", (201, 100), RED), 1.0, (1, 2, 3))
    assert canvas.size == (201, 201)
    column = [canvas.getpixel((0, y)) for y in range(201)]
    assert (
        column[:50] == [(1, 2, 3)] * 50 and column[50:150] == [RED] * 100 and column[150:] == [(1, 2, 3)] * 51
    )
    tall = letterbox(Image.new("RGB", (100, 200), RED), 1.0, (1, 2, 3))
    row = [tall.getpixel((x, 0)) for x in range(200)]
    assert row[:50] == [(1, 2, 3)] * 50 and row[50:150] == [RED] * 100 and row[150:] == [(1, 2, 3)] * 50
    square = Image.new("RGB", (64, 64), RED)
    assert letterbox(square, 1.0, (0, 0, 0)) is square


def test_center_crop_keeps_the_middle_and_resize_squashes() -> None:
    """400 x 200: blue | red (cols 100-299) | green. center_crop to 100: shorter side 200 -> 100, then the
    middle 100 of 200 columns = original columns 100-299, all red; resize squashes all three colours in."""
    image = Image.new("RGB", (400, 200), (0, 0, 255))
    image.paste(Image.new("RGB", (200, 200), RED), (100, 0))
    image.paste(Image.new("RGB", (100, 200), (0, 255, 0)), (300, 0))
    crop = make_transform(config(100), "center_crop")(image)
    assert crop.shape == (3, 100, 100)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(crop[:, :, 3:97], red.expand(3, 100, 94), atol=1 / 255)
    squashed = make_transform(config(100), "resize")(image)
    assert squashed.shape == (3, 100, 100)
    assert squashed[2, 50, 5] > 0.99 and squashed[0, 50, 50] > 0.99 and squashed[1, 50, 95] > 0.99


@pytest.mark.parametrize("size", [(512, 256), (300, 333)])
def test_center_crop_equals_timms_eval_transform(size) -> None:
    """SigLIP-384's data config (crop_pct 0.9, bicubic): shorter side floor(384 / 0.9) = 426, centre 384."""
    cfg = timm.data.resolve_data_config(
        pretrained_cfg=timm.get_pretrained_cfg("vit_so400m_patch14_siglip_384").to_dict()
    )
    image = noise(*size)
    ours = make_transform(cfg, "center_crop")(image)
    ref = create_transform(**cfg, is_training=False)(image)  # normalised: undo it
    ref = ref * torch.tensor(cfg["std"]).view(3, 1, 1) + torch.tensor(cfg["mean"]).view(3, 1, 1)
    assert ours.shape == (3, 384, 384)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_interpolation_is_taken_from_the_config(interpolation: str) -> None:
    image = noise(90, 60)
    filters = {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
    }
    out = make_transform(config(32, interpolation), "resize")(image)
    assert torch.equal(out, TF.to_tensor(image.resize((32, 32), filters[interpolation])))
    for other, f in filters.items():
        if other != interpolation:
            assert not torch.equal(out, TF.to_tensor(image.resize((32, 32), f))), other


def test_outputs_are_in_0_1_for_any_image_mode() -> None:
    for image in (noise(50, 40).convert("L"), noise(50, 40).convert("RGBA"), noise(40, 50)):
        for mode in ("resize", "center_crop", "pad"):
            out = make_transform(config(24), mode)(image)
            assert out.shape == (3, 24, 24) and out.min() >= 0 and out.max() <= 1


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="allowed: resize, center_crop, pad"):
        make_transform(config(24), "letterbox")


def test_encoder_preprocess_uses_its_own_data_config() -> None:
    enc = TimmViT(
        "vit_large_patch14_clip_336.openai",
        img_size=56,
        model_args={"embed_dim": 32, "depth": 2, "num_heads": 2},
    )
    out = enc.preprocess(Image.new("RGB", (112, 56), RED))  # pad: bands of 14 rows at 56 px
    assert out.shape == (3, 56, 56)
    assert torch.allclose(out[:, :12], fill_of(CLIP_MEAN).view(3, 1, 1).expand(3, 12, 56), atol=1 / 255)
    assert enc.transform("center_crop")(noise(80, 60)).shape == (3, 56, 56)
    with torch.no_grad():
        assert enc(out[None]).shape == (1, 16, 32)
