"""The vision data path and the token plan: preprocessing against timm's own transforms, AnyRes layouts and
counts worked out by hand, one encoder call per batch, frame sampling, and the token-budget policies."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

from components.encoders.preprocess import make_transform, to_pil
from tests.conftest import TINY_MODEL
from toolkit.data.collate import Collator
from toolkit.data.markup import IMAGE
from toolkit.data.tokenizer import build_word_tokenizer, image_token_id
from toolkit.data.vision import VisionProcessor, uniform_indices
from toolkit.errors import ChimeraError
from toolkit.token_plan import TokenPlan, VisionSettings

CLIP = TokenPlan(336, 576, (24, 24), VisionSettings(anyres=True))  # CLIP-336, no pooling


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def human(value: str) -> dict[str, str]:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict[str, str]:
    return {"from": "gpt", "value": value}


# -- preprocessing against timm -----------------------------------------------------------------------------


def _clip_config() -> dict:
    cfg = timm.data.resolve_data_config(
        pretrained_cfg=timm.get_pretrained_cfg("vit_large_patch14_clip_336.openai").to_dict()
    )
    return cfg


def _unnormalise(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    return x * torch.tensor(cfg["std"]).view(3, 1, 1) + torch.tensor(cfg["mean"]).view(3, 1, 1)


@pytest.mark.parametrize("size", [(500, 260), (300, 420)])
def test_resize_and_center_crop_equal_timms_eval_transforms(size) -> None:
    """resize = timm's crop_mode 'squash'; center_crop = timm's crop_mode 'center' (CLIP-336, crop_pct 1)."""
    cfg, image = _clip_config(), noise(*size)
    for mode, crop_mode in (("resize", "squash"), ("center_crop", "center")):
        ours = make_transform(cfg, mode)(image)
        ref = _unnormalise(create_transform(**{**cfg, "crop_mode": crop_mode}, is_training=False)(image), cfg)
        assert ours.shape == (3, 336, 336)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_pad_is_llava_expand2square_then_timms_squash() -> None:
    """pad = LLaVA-1.5's expand2square (haotian-liu/LLaVA llava/mm_utils.py, written out here) in the mean
    colour, then timm's own resize."""
    cfg, image = _clip_config(), noise(400, 250)
    fill = tuple(int(x * 255) for x in cfg["mean"])
    canvas = Image.new("RGB", (400, 400), fill)  # expand2square: width > height -> paste at (0, (w - h) // 2)
    canvas.paste(image, (0, (400 - 250) // 2))
    ref = _unnormalise(create_transform(**{**cfg, "crop_mode": "squash"}, is_training=False)(canvas), cfg)
    torch.testing.assert_close(make_transform(cfg, "pad")(image), ref, rtol=0, atol=1e-6)


def test_tensors_at_the_encoder_size_pass_untouched_others_take_the_pillow_path() -> None:
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5)}
    x = torch.rand(3, 32, 32)
    for mode in ("resize", "pad", "center_crop"):
        assert torch.equal(make_transform(cfg, mode)(x), x)  # the synthetic datasets' images
    y = torch.rand(3, 20, 48)
    for mode in ("resize", "pad", "center_crop"):
        torch.testing.assert_close(make_transform(cfg, mode)(y), make_transform(cfg, mode)(to_pil(y)))


# -- the token plan ---------------------------------------------------------------------------------------


def test_anyres_counts_worked_out_by_hand() -> None:
    # 672 x 672 -> 2x2, a 48 x 48 map, no padding: 576 + 48 * 49 = 2928 (LLaVA-NeXT-336's maximum); 2880 without NL
    assert CLIP.image_tokens(672, 672) == 2928 and CLIP.image_tokens(672, 672, newline=False) == 2880
    # 1000 x 500 -> 1x2 (672 x 336, the same 2:1 ratio): a 24 x 48 map, nothing cut: 576 + 24 * 49 = 1752
    assert CLIP.grid_for(1000, 500) == (1, 2) and CLIP.image_tokens(1000, 500) == 1752
    # 800 x 600 -> 2x2: the image fills the map's width; new_h = int(600 * 48 / 800) = 36 rows kept of 48
    # (6 cut above, 6 below): 576 + 36 * 49 = 2340; without unpad 2928
    assert CLIP.grid_for(800, 600) == (2, 2) and CLIP.tile_map(2, 2, 800, 600) == (6, 42, 0, 48)
    assert CLIP.image_tokens(800, 600) == 2340
    no_unpad = TokenPlan(336, 576, (24, 24), VisionSettings(anyres=True, unpad=False))
    assert no_unpad.image_tokens(800, 600) == 2928
    # 500 x 1000 -> 2x1 map 48 x 24, exact: 576 + 48 * 25 = 1776; longllava: 576 + 2 * 576 + 2 rows = 1730
    assert CLIP.image_tokens(500, 1000) == 1776
    longllava = TokenPlan(336, 576, (24, 24), VisionSettings(anyres=True, layout="longllava"))
    assert longllava.image_tokens(500, 1000) == 1730 and longllava.image_tokens(672, 672) == 576 * 5 + 2
    plain = TokenPlan(336, 144, (12, 12))
    assert plain.grid_for(672, 672) is None and plain.image_tokens(672, 672) == 144


def test_arrange_matches_the_counts_and_the_layout_order() -> None:
    """View v's tokens are all v (value = view index): the sequence shows the layout's order."""
    D = 2
    plan = TokenPlan(4, 4, (2, 2), VisionSettings(anyres=True, layout="llava_next", unpad=False))
    feats = torch.arange(5, dtype=torch.float32).view(5, 1, 1).expand(5, 4, D).clone()  # global + 2x2 tiles
    newline = torch.full((D,), -1.0)
    row = [5, 2, 2, 8, 8, 0]
    out = plan.arrange(feats, torch.tensor([row]), newline)
    assert out.shape[0] == plan.tokens(row) == 4 + 4 * 5
    # global view, then the stitched 4 x 4 map row by row (tiles 1 2 | 3 4), each row ending in the newline
    map_rows = [[1, 1, 2, 2, -1], [1, 1, 2, 2, -1], [3, 3, 4, 4, -1], [3, 3, 4, 4, -1]]
    assert out[:, 0].tolist() == [0] * 4 + [v for r in map_rows for v in r]
    longllava = TokenPlan(4, 4, (2, 2), VisionSettings(anyres=True, layout="longllava"))
    out = longllava.arrange(feats, torch.tensor([row]), newline)
    assert out[:, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [-1] + [3] * 4 + [4] * 4 + [-1]
    assert out.shape[0] == longllava.tokens(row)


def test_llava_next_needs_a_grid_and_settings_are_checked() -> None:
    with pytest.raises(ChimeraError, match="model.vision.layout: llava_next stitches"):
        TokenPlan(336, 144, None, VisionSettings(anyres=True))
    TokenPlan(336, 144, None, VisionSettings(anyres=True, layout="longllava"))  # fine
    with pytest.raises(ChimeraError, match="model.vision.grids"):
        VisionSettings.from_config({"grids": "tiles"})
    with pytest.raises(ChimeraError, match="model.vision.layout"):
        VisionSettings.from_config({"layout": "llava"})
    with pytest.raises(ChimeraError, match="model.vision.tiles: unknown key"):
        VisionSettings.from_config({"tiles": 4})


# -- frames -----------------------------------------------------------------------------------------------


def test_uniform_frame_sampling() -> None:
    assert uniform_indices(12, 8) == [0, 2, 3, 5, 6, 8, 9, 11]  # linspace(0, 11, 8) rounded (half to even)
    assert uniform_indices(100, 4) == [0, 33, 66, 99]
    assert uniform_indices(5, 8) == [0, 1, 2, 3, 4] and uniform_indices(7, 1) == [0]
    assert uniform_indices(10, 2) == [0, 9]


# -- collator + model: an AnyRes batch --------------------------------------------------------------------

WORDS = ["what", "is", "it", "?", "red", "blue", "and", "frames"]


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


def _model(tok, **vision):
    from toolkit.model import build_model

    cfg = {**TINY_MODEL, "vision": {"anyres": True, **vision}}
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=len(tok), image_token_id=image_token_id(tok))


def _processor(model, **kw) -> VisionProcessor:
    return VisionProcessor(model.token_plan, model.encoder.data_config, **kw)


def _samples() -> list[dict]:
    """An AnyRes image 40 x 20 (1x2 tiles of 16), one square image, a 3-frame video, a text-only sample."""
    frames = [Image.new("RGB", (24, 18), (10 * i, 0, 0)) for i in range(3)]
    return [
        {
            "id": "wide",
            "images": [noise(40, 20)],
            "conversations": [human(f"{IMAGE}\nwhat is it ?"), gpt("red")],
        },
        {
            "id": "two",
            "images": [noise(16, 16, 1), torch.rand(3, 16, 16)],  # a Pillow image and a synthetic tensor
            "conversations": [human(f"{IMAGE} {IMAGE}\nwhat is it ?"), gpt("blue")],
        },
        {
            "id": "video",
            "images": frames,
            "frames": [[0, 1, 2]],
            "conversations": [human(f"{IMAGE} {IMAGE} {IMAGE}\nframes ?"), gpt("red")],
        },
        {"id": "text", "images": None, "conversations": [human("what is it ?"), gpt("blue")]},
    ]


@pytest.mark.parametrize("layout", ["llava_next", "longllava"])
def test_anyres_batch_through_collator_and_model(tok, layout) -> None:
    model = _model(tok, layout=layout)
    plan = model.token_plan  # 16 px tiles, 4 x 4 patches pooled to 2 x 2: 4 tokens per view
    assert (plan.image_size, plan.view_tokens, plan.view_grid) == (16, 4, (2, 2))
    batch = Collator(tok, 4, 512, vision=_processor(model))(_samples())
    # wide: 1x2 grid -> global + 2 tiles; two: 16 x 16 -> 2x1 (LLaVA-NeXT's first 2-tile pinpoint on a tie):
    # 3 views each; frames: 1 view each
    rows = batch["image_layout"].tolist()
    assert (
        rows
        == [[3, 1, 2, 40, 20, 0], [3, 2, 1, 16, 16, 0], [3, 2, 1, 16, 16, 0]] + [[1, 0, 0, 24, 18, 1]] * 3
    )
    assert batch["images"].shape == (3 + 3 + 3 + 3, 3, 16, 16)
    expected = [plan.tokens(r) for r in rows]
    if layout == "llava_next":
        # wide: a 2 x 4 map, nothing cut, a newline per row: 4 + 2 * 5 = 14. 16 x 16 on 2x1 (16 x 32 px): a 4 x 2
        # map whose image fills the width: new_h = int(16 * 2 / 16) = 2 rows kept (1 cut above, 1 below):
        # 4 + 2 * 3 = 10
        assert expected[:3] == [14, 10, 10]
    else:  # global + 2 tiles + one newline per row of tiles
        assert expected[:3] == [4 + 8 + 1, 4 + 8 + 2, 4 + 8 + 2]
    img = image_token_id(tok)
    per_sample = [sum(expected[:1]), sum(expected[1:3]), sum(expected[3:]), 0]
    assert (batch["input_ids"] == img).sum(1).tolist() == per_sample
    assert int(batch["n_over_budget"]) == 0

    calls = []
    model.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    logits = model(batch["input_ids"], batch["images"], image_layout=batch["image_layout"])
    assert calls == [12]  # every view of the batch in one encoder call
    assert logits.shape[:2] == batch["input_ids"].shape
    logits.float().pow(2).mean().backward()
    assert model.image_newline.weight.grad is not None and model.image_newline.weight.grad.abs().sum() > 0

    with pytest.raises(ChimeraError, match="image-token positions"):  # a plan the batch does not match
        model(batch["input_ids"], batch["images"], image_layout=batch["image_layout"][:-1])


def test_no_newline_no_parameter(tok) -> None:
    model = _model(tok, newline=False)
    assert model.image_newline is None
    assert not any("image_newline" in n for n, _ in model.named_parameters())
    batch = Collator(tok, 4, 512, vision=_processor(model))(_samples()[:1])
    assert int((batch["input_ids"] == image_token_id(tok)).sum()) == 4 + 2 * 4
    model(batch["input_ids"], batch["images"], image_layout=batch["image_layout"])


# -- the token budget -------------------------------------------------------------------------------------


def test_budget_error_names_the_sample(tok) -> None:
    model = _model(tok)
    collate = Collator(tok, 4, 512, where="data.train", vision=_processor(model, max_image_tokens=10))
    with pytest.raises(
        ChimeraError, match=r"data.train sample 'wide': 14 image tokens exceed data.max_image_tokens=10"
    ):
        collate(_samples()[:1])


def test_budget_fewer_tiles(tok) -> None:
    model = _model(tok, grids="anyres_max_4")
    big = {
        "id": "big",
        "images": [noise(64, 64)],
        "conversations": [human(f"{IMAGE}\nwhat is it ?"), gpt("red")],
    }
    plan = model.token_plan
    assert plan.grid_for(64, 64) == (2, 2) and plan.image_tokens(64, 64) == 4 + 4 * 5  # 24
    collate = Collator(tok, 4, 512, vision=_processor(model, max_image_tokens=16, over_budget="fewer_tiles"))
    batch = collate([big])
    # cap 3 tiles: every grid of <= 3 tiles keeps 16 x 16 = 256 pixels of the 64 x 64 image, and 1x1 wastes
    # nothing (LLaVA-NeXT's rule): a 2 x 2 map, 4 + 2 * 3 = 10 <= 16
    assert batch["image_layout"].tolist() == [[2, 1, 1, 64, 64, 0]] and int(batch["n_over_budget"]) == 1
    assert int((batch["input_ids"] == image_token_id(tok)).sum()) == 10
    # a cap only the global view fits: one view
    batch = Collator(tok, 4, 512, vision=_processor(model, max_image_tokens=4, over_budget="fewer_tiles"))(
        [big]
    )
    assert batch["image_layout"].tolist() == [[1, 0, 0, 64, 64, 0]]
    model(batch["input_ids"], batch["images"], image_layout=batch["image_layout"])
    with pytest.raises(ChimeraError, match="fewer_tiles cannot fit it even with every AnyRes image reduced"):
        Collator(tok, 4, 512, vision=_processor(model, max_image_tokens=3, over_budget="fewer_tiles"))([big])


def test_budget_fewer_frames(tok) -> None:
    model = _model(tok)
    n = 8
    frames = [Image.new("RGB", (16, 16), (20 * i, 0, 0)) for i in range(n)]
    video = {
        "id": "video",
        "images": [noise(16, 16), *frames],  # an image (2x1 AnyRes: 10 tokens) then 8 frames (4 each)
        "frames": [list(range(1, n + 1))],
        "conversations": [human(f"{IMAGE}\nand {' '.join([IMAGE] * n)}\nframes ?"), gpt("red")],
    }
    collate = Collator(tok, 4, 512, vision=_processor(model, max_image_tokens=22, over_budget="fewer_frames"))
    batch = collate([video])
    # 22 - 10 = 12 tokens left: 3 frames, sampled uniformly from 8: frames 0, 4 (3.5 rounds to even), 7
    rows = batch["image_layout"].tolist()
    assert rows[0][:3] == [3, 2, 1] and rows[1:] == [[1, 0, 0, 16, 16, 1]] * 3
    kept = batch["images"][3:, 0, 0, 0] * 255
    assert [round(float(v)) for v in kept] == [0, 80, 140]
    assert int((batch["input_ids"] == image_token_id(tok)).sum()) == 10 + 3 * 4
    assert int(batch["n_over_budget"]) == 1
    model(batch["input_ids"], batch["images"], image_layout=batch["image_layout"])
    with pytest.raises(ChimeraError, match="fewer_frames cannot fit it with one frame per video"):
        Collator(tok, 4, 512, vision=_processor(model, max_image_tokens=13, over_budget="fewer_frames"))(
            [video]
        )


def test_processor_checks_its_settings() -> None:
    cfg = {"input_size": (3, 16, 16)}
    plan = TokenPlan(16, 4, (2, 2))
    with pytest.raises(ChimeraError, match="data.preprocess: 'letterbox'"):
        VisionProcessor(plan, cfg, preprocess="letterbox")
    with pytest.raises(ChimeraError, match="data.over_budget: 'drop'"):
        VisionProcessor(plan, cfg, over_budget="drop")
    with pytest.raises(ChimeraError, match="image 0 is a str"):
        VisionProcessor(plan, cfg)({"id": "x", "images": ["a.png"], "conversations": []}, "s")


def test_synthetic_batches_are_unchanged_by_the_vision_path(tok) -> None:
    """The quick start's data: synthetic tensors at the encoder's size under the default ``resize`` give the
    same batch as the plain collator did before the vision path existed, and the same embeddings."""
    from components.datasets.synthetic_shapes import SyntheticShapes
    from toolkit.model import build_model

    data = SyntheticShapes(size=4, image_size=16, tasks=["color"], images_per_sample=2)
    samples = [data[i] for i in range(4)]
    words = build_word_tokenizer(SyntheticShapes.vocabulary())
    model = build_model(TINY_MODEL, vocab_size=len(words), image_token_id=image_token_id(words))
    old = Collator(words, model.image_tokens, 64)(samples)
    new = Collator(words, model.image_tokens, 64, vision=_processor(model))(samples)
    for key in ("input_ids", "labels", "attention_mask", "images"):
        assert torch.equal(old[key], new[key]), key
    assert new["image_layout"].tolist() == [[1, 0, 0, 16, 16, 0]] * 8
    with torch.no_grad():
        a = model.embed(old["input_ids"], old["images"])
        b = model.embed(new["input_ids"], new["images"], new["image_layout"])
    assert torch.equal(a, b)


def test_images_for_inference_match_the_collator(tok) -> None:
    """Generation and evaluation get the same views, layout and counts as training (``processor.images``)."""
    model = _model(tok)
    processor = _processor(model)
    samples = _samples()
    views, layout, tokens = processor.images(samples[0]["images"])
    batch = Collator(tok, 4, 512, vision=processor)(samples[:1])
    assert (
        torch.equal(views, batch["images"]) and torch.equal(layout, batch["image_layout"]) and tokens == [14]
    )
    views, layout, tokens = processor.images(samples[2]["images"], frames=[[0, 1, 2]])
    assert layout.tolist() == [[1, 0, 0, 24, 18, 1]] * 3 and tokens == [4, 4, 4]
    assert processor.images([]) == (None, None, [])


def test_newline_initialises_after_a_meta_build(tok) -> None:
    """``strategy.init: meta``: the newline embedding materialises through its own ``reset_parameters``."""
    from toolkit.init import materialize
    from toolkit.model import build_model

    with torch.device("meta"):
        model = build_model(
            {**TINY_MODEL, "vision": {"anyres": True}},
            vocab_size=len(tok),
            image_token_id=image_token_id(tok),
        )
    assert model.image_newline.weight.is_meta
    assert "image_newline.weight" in materialize(model, "cpu")
    w = model.image_newline.weight
    assert torch.isfinite(w).all() and 0.05 < float(w.detach().std()) < 0.4  # randn / sqrt(32) ~ 0.18


def test_frames_pooled_after_the_connector_as_llava_next_video(tok) -> None:
    """``frame_stride``: a frame's 2 x 2 token grid is average-pooled after the connector (1 token at stride 2),
    plain and AnyRes images are not; counts, one encoder call and the pooled values agree."""
    model = _model(tok, frame_stride=2)
    plan = model.token_plan
    assert plan.frame_grid == (1, 1) and plan.frame_tokens == 1 and plan.view_tokens == 4
    batch = Collator(tok, 4, 512, vision=_processor(model))(_samples())
    img = image_token_id(tok)
    assert (batch["input_ids"] == img).sum(1).tolist() == [14, 20, 3, 0]  # the video: 3 frames x 1 token
    embeds = model.embed(batch["input_ids"], batch["images"], batch["image_layout"])
    with torch.no_grad():
        frame_feats = model.encode_images(batch["images"][-3:])  # [3, 4, D]: the three frames' own views
    video_slots = embeds[2][batch["input_ids"][2] == img]  # [3, D]
    torch.testing.assert_close(video_slots.detach(), frame_feats.mean(1))
    on_clip = TokenPlan(336, 576, (24, 24), VisionSettings(frame_stride=2))
    assert on_clip.frame_tokens == 144 and on_clip.tokens(on_clip.row(640, 480, None, frame=True)) == 144
    assert TokenPlan(384, 729, (27, 27), VisionSettings(frame_stride=2)).frame_tokens == 196
    with pytest.raises(
        ChimeraError, match="model.vision.frame_stride: frames are pooled on their token grid"
    ):
        TokenPlan(336, 144, None, VisionSettings(frame_stride=2))
