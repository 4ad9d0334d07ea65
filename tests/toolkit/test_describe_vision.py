"""``chimera describe`` reports tokens per image from the token plan: CLIP-336 and SigLIP-384 under identity and
2D pooling (stride 2, stride 4, target 36 / 144), and an AnyRes 2x2 image with and without newline tokens.
The numbers are the table of docs/vision.md (full-size encoders built on the meta device, a tiny decoder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from toolkit.cli import main
from toolkit.describe import describe

ROOT = Path(__file__).resolve().parents[2]
CLIP = {"name": "timm_vit", "model_name": "vit_large_patch14_clip_336.openai", "select_layer": -2}
SIGLIP = {"name": "timm_vit", "model_name": "vit_so400m_patch14_siglip_384", "select_layer": -2}
DECODER = {
    "name": "hybrid",
    "d_model": 64,
    "n_layers": 2,
    "pattern": "transformer",
    "mixers": {"attention": {"n_heads": 2}},
    "ffns": {"mlp": {"d_ff": 128}},
}

# (encoder, pooler) -> (tokens per image, AnyRes 2x2 with newline, without): docs/vision.md's table
TABLE = [
    (CLIP, {"name": "identity"}, (576, 2928, 2880)),
    (CLIP, {"name": "pool2d", "stride": 2}, (144, 744, 720)),
    (CLIP, {"name": "pool2d", "stride": 4}, (36, 192, 180)),
    (CLIP, {"name": "pool2d", "target": 36}, (36, 192, 180)),
    (SIGLIP, {"name": "identity"}, (729, 3699, 3645)),
    (SIGLIP, {"name": "pool2d", "stride": 2}, (196, 1008, 980)),  # 27 -> ceil(27 / 2) = 14 per side
    (SIGLIP, {"name": "pool2d", "stride": 4}, (49, 259, 245)),
    (SIGLIP, {"name": "pool2d", "target": 36}, (36, 192, 180)),
    (SIGLIP, {"name": "pool2d", "target": 144}, (144, 744, 720)),
]


def experiment(tmp_path: Path, encoder: dict, pooler: dict, vision: dict | None = None) -> Path:
    cfg = {
        "base": [str(ROOT / "experiments" / "strategies" / "single.yaml")],
        "model": {"encoder": encoder, "pooler": pooler, "decoder": DECODER, "vision": vision or {}},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "vision.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("encoder", "pooler", "expected"), TABLE, ids=[f"{e['model_name'][:12]}-{p}" for e, p, _ in TABLE]
)
def test_tokens_per_image_table(tmp_path, encoder, pooler, expected) -> None:
    info = describe(experiment(tmp_path, encoder, pooler))
    t = info["tokens_per_image"]
    assert info["image_tokens"] == t["image"] == expected[0]
    assert (t["anyres_2x2"]["newline"], t["anyres_2x2"]["no_newline"]) == expected[1:]
    assert t["anyres_2x2"]["size"] == ([672, 672] if encoder is CLIP else [768, 768])
    assert t["anyres"] is False  # reported as what turning AnyRes on would cost


def test_describe_prints_the_anyres_line_and_counts_the_newline(tmp_path, capsys) -> None:
    path = experiment(tmp_path, CLIP, {"name": "identity"}, {"anyres": True})
    assert main(["describe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "image tokens  576 per image" in out
    assert "image_newline ImageNewline" in out  # its own row: the rows sum to the total
    assert "anyres 2x2    672x672 px image: 2928 tokens with newline, 2880 without (layout llava_next" in out
    info = describe(path)
    newline = info["params"]["total"] - describe(path, ["model.vision.newline=false"])["params"]["total"]
    assert newline == 64  # the learned newline embedding: one d_model vector
    longllava = describe(path, ["model.vision.layout=longllava"])["tokens_per_image"]["anyres_2x2"]
    assert (longllava["newline"], longllava["no_newline"]) == (576 * 5 + 2, 576 * 5)
    frames = describe(path, ["model.vision.frame_stride=2"])["tokens_per_image"]  # LLaVA-NeXT-Video
    assert (frames["image"], frames["frame"]) == (576, 144)
    assert main(["describe", str(path), "model.vision.frame_stride=2"]) == 0
    assert "video frame   144 tokens per frame" in capsys.readouterr().out
