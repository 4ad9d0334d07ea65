"""The shipped LLaVA line (experiments/llava/): each file describes at full size on the meta device with the
published parameter count and tokens per image, and trains a couple of steps in miniature (mini/) on CPU.

Parameter counts are checked EXACTLY against the published parts (CLIP ViT-L/14 vision tower, projector,
Vicuna/LLaMA-7B, LLaVA-NeXT's image_newline), after the one documented difference: ``select_layer: -2`` prunes
the tower's last block and final LayerNorm (12,598,272 parameters), which LLaVA never reads. The totals are
also within 0.2% of the rounded published figure (7.06B for 1.5 / NeXT / NeXT-Video; 1.0 publishes none).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from tests.conftest import ROOT

LLAVA = ROOT / "experiments" / "llava"
VICUNA_7B = 6_738_415_616  # 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 2 x 32000 x 4096 + 4096
CLIP_L_224 = 303_179_776  # openai/clip-vit-large-patch14 vision tower (257 positions)
CLIP_L_336 = 303_507_456  # openai/clip-vit-large-patch14-336 vision tower (577 positions)
PRUNED = 12_596_224 + 2_048  # the last of 24 blocks and the final LayerNorm: select_layer -2 never reads them
MLP2X = 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu, 20,979,712
LINEAR = 1024 * 4096 + 4096  # LLaVA-1.0's W, 4,198,400
NEWLINE = 4096  # LLaVA-NeXT's image_newline
PUBLISHED_TOTAL = 7.06e9

# file -> (published total from its parts, what describe must report, tokens per image or frame)
LINE = {
    "llava_10": (CLIP_L_224 + LINEAR + VICUNA_7B, CLIP_L_224 - PRUNED + LINEAR + VICUNA_7B, 256),
    "llava_15": (CLIP_L_336 + MLP2X + VICUNA_7B, CLIP_L_336 - PRUNED + MLP2X + VICUNA_7B, 576),
    "llava_next": (
        CLIP_L_336 + MLP2X + VICUNA_7B + NEWLINE,
        CLIP_L_336 - PRUNED + MLP2X + VICUNA_7B + NEWLINE,
        576,  # per view; the AnyRes maximum is checked below
    ),
    "llava_next_video": (
        CLIP_L_336 + MLP2X + VICUNA_7B + NEWLINE,
        CLIP_L_336 - PRUNED + MLP2X + VICUNA_7B + NEWLINE,
        576,  # per view of a still image; a frame's 144 is checked below
    ),
}


@pytest.fixture(scope="module")
def described() -> dict:
    """``describe`` of every full-size file in ONE subprocess, with its peak memory (meta device: no weights)."""
    code = (
        "import json, resource, sys, time\n"
        "from toolkit.describe import describe\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    t = time.perf_counter()\n"
        "    info = describe(path)\n"
        "    info['seconds'] = time.perf_counter() - t\n"
        "    out[path] = info\n"
        "out['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
        "print(json.dumps(out))\n"
    )
    paths = [str(LLAVA / f"{name}.yaml") for name in LINE]
    run = subprocess.run(
        [sys.executable, "-c", code, *paths], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return {name: out[str(LLAVA / f"{name}.yaml")] for name in LINE} | {"peak_rss_gb": out["peak_rss_gb"]}


@pytest.mark.parametrize("name", list(LINE))
def test_describe_gives_the_published_count_and_tokens(described, name):
    published, expected, tokens = LINE[name]
    info = described[name]
    parts = info["params"]["by_component"]
    assert info["params"]["total"] == expected, (name, info["params"]["total"] - expected)
    assert published - info["params"]["total"] == PRUNED  # the documented difference
    if name != "llava_10":  # LLaVA-1.0 publishes no total
        assert abs(published - PUBLISHED_TOTAL) / PUBLISHED_TOTAL < 0.002
        assert abs(info["params"]["total"] - PUBLISHED_TOTAL) / PUBLISHED_TOTAL < 0.002
    assert parts["decoder"]["total"] == VICUNA_7B
    assert sum(part["total"] for part in parts.values()) == info["params"]["total"]  # every row counted
    if name.startswith("llava_next"):
        assert parts["image_newline"]["total"] == NEWLINE
    else:
        assert "image_newline" not in parts
    assert parts["connector"]["total"] == (LINEAR if name == "llava_10" else MLP2X)
    assert parts["encoder"]["trainable"] == 0 and info["encoder"]["width"] == 1024
    assert info["image_tokens"] == tokens and info["tokens_per_image"]["image"] == tokens
    frame = 144 if name == "llava_next_video" else tokens  # NeXT-Video pools frames: 24x24 -> 12x12
    assert info["tokens_per_image"]["frame"] == frame
    assert info["seconds"] < 120  # a meta-device build: seconds, even on a busy 2-core machine


def test_describe_allocates_no_weights(described):
    assert described["peak_rss_gb"] < 4  # four 7B models in fp32 would be ~113 GB


def test_stages_train_the_published_parts(described):
    for name in ("llava_10", "llava_15", "llava_next"):
        stages = described[name]["stages"]
        assert stages["pretrain"]["trainable_parts"] == ["connector"]
        assert stages["pretrain"]["trainable"] == (LINEAR if name == "llava_10" else MLP2X)
    assert described["llava_15"]["stages"]["finetune"]["trainable_parts"] == ["connector", "decoder"]
    next_ft = described["llava_next"]["stages"]["finetune"]  # LLaVA-NeXT also tunes the vision tower
    assert next_ft["trainable_parts"] == ["connector", "decoder", "encoder", "image_newline"]


@pytest.mark.parametrize("name", ["llava_next", "llava_next_video"])
def test_next_anyres_maximum_is_2928_tokens(described, name):
    """LLaVA-NeXT's grids (2x1, 1x2, 2x2, 1x3, 3x1 tiles of 336 px): an image that fills grid r x c gets
    576 (global view) + (24 r) x (24 c) + 24 r (newline per feature row) tokens; the most is 2x2: 2,928."""
    from omegaconf import OmegaConf

    from toolkit.config import load_config
    from toolkit.token_plan import TokenPlan, VisionSettings

    vision = load_config(LLAVA / f"{name}.yaml", validate=False).model.vision
    plan = TokenPlan(336, 576, (24, 24), VisionSettings.from_config(OmegaConf.to_container(vision)))
    by_grid = {}
    for rows, cols in plan.grids:
        width, height = cols * 336, rows * 336
        assert plan.grid_for(width, height) == (rows, cols)
        by_grid[(rows, cols)] = plan.image_tokens(width, height)
        assert by_grid[(rows, cols)] == 576 + (24 * rows) * (24 * cols) + 24 * rows
    assert set(by_grid) == {(2, 1), (1, 2), (2, 2), (1, 3), (3, 1)}
    assert max(by_grid.values()) == by_grid[(2, 2)] == 2928
    assert plan.largest_image() == ((2, 2), 2928, 5)  # what chimera plan assumes: + global view + 4 tiles
    anyres = described[name]["tokens_per_image"]
    assert anyres["anyres"] is True and anyres["anyres_2x2"]["newline"] == 2928
    assert anyres["anyres_2x2"]["no_newline"] == 2880


def test_published_data_and_video_settings():
    """1.5 letterboxes (pad), 1.0 and NeXT-Video frames centre-crop like CLIP's processor; NeXT-Video pools
    frames only, after the projector (stride 2), and scales RoPE linearly by 2: 32 x 144 tokens fit in 8,192."""
    from toolkit.config import load_config

    assert load_config(LLAVA / "llava_15.yaml").data.preprocess == "pad"
    assert load_config(LLAVA / "llava_10.yaml").data.preprocess == "center_crop"
    cfg = load_config(LLAVA / "llava_next_video.yaml")
    assert cfg.data.preprocess == "center_crop"
    assert cfg.model.pooler.name == "identity" and cfg.model.vision.frame_stride == 2
    attention = cfg.model.decoder.mixers.attention
    assert attention.rope_type == "linear" and attention.rope_scaling == 2.0
    assert 32 * 144 <= cfg.data.max_length == 2 * 4096


@pytest.mark.parametrize("name", list(LINE))
def test_miniature_keeps_the_published_settings(name):
    """The tiny base changes sizes only: everything else of the published file survives in mini/."""
    from omegaconf import OmegaConf

    from toolkit.config import load_config

    full = OmegaConf.to_container(load_config(LLAVA / f"{name}.yaml"), resolve=True)
    mini = OmegaConf.to_container(load_config(LLAVA / "mini" / f"{name}.yaml"), resolve=True)
    assert mini["model"]["encoder"]["img_size"] == 48 and mini["model"]["decoder"]["d_model"] == 64
    for key in ("model_name", "select_layer", "drop_prefix_tokens", "freeze"):
        assert mini["model"]["encoder"][key] == full["model"]["encoder"][key]
    for key in ("pooler", "connector", "pool_after_connector", "vision"):
        assert mini["model"][key] == full["model"][key]
    for key in ("pattern", "norm_eps"):
        assert mini["model"]["decoder"][key] == full["model"]["decoder"][key]
    full_attn, mini_attn = (
        full["model"]["decoder"]["mixers"]["attention"],
        mini["model"]["decoder"]["mixers"]["attention"],
    )
    for key in set(full_attn) - {"n_heads", "n_kv_heads"}:
        assert mini_attn[key] == full_attn[key]
    assert (
        mini["data"]["template"] == full["data"]["template"]
        and mini["data"]["preprocess"] == full["data"]["preprocess"]
    )
    assert [s["trainable"] for s in mini["stages"]] == [s["trainable"] for s in full["stages"]]
    assert mini["name"] == f"{name}_mini"  # its own run folder


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LINE))
def test_miniature_trains_on_cpu(name, tmp_path, capsys):
    """Two steps (per stage) of each miniature on CPU, through `chimera train`."""
    import time

    from toolkit.cli import main

    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    args = ["train", str(LLAVA / "mini" / f"{name}.yaml"), "trainer.max_steps=2", f"output_dir={tmp_path}"]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    stages = ["pretrain", "finetune"] if name != "llava_next_video" else [f"{name}_mini"]
    for stage in stages:
        assert f"chimera: {stage}: run " in out and "train/loss=" in out
    print(
        f"{name}: {time.perf_counter() - t0:.1f} s wall, "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0:.1f} s CPU"
    )


@pytest.mark.slow
def test_next_video_miniature_trains_on_video_frames(tmp_path, capsys):
    """The NeXT-Video miniature on real frame folders (LLaVA format, 12 frames of 60 x 40 px per clip): 4
    frames sampled per video, each centre-cropped to one 48 px view (never tiled), 8x8 tokens pooled after
    the projector to 4x4 = 16 per frame; then two training steps."""
    import io

    import fsspec
    from PIL import Image

    from toolkit.assemble import build_parts
    from toolkit.cli import main
    from toolkit.data.tokenizer import build_word_tokenizer
    from toolkit.plan import load_plan

    root = f"memory://llava-line-{tmp_path.name}"
    records = []
    for clip in range(4):
        for i in range(12):
            buf = io.BytesIO()
            Image.new("RGB", (60, 40), (20 * i, 10 * clip, 100)).save(buf, format="PNG")
            with fsspec.open(f"{root}/videos/clip{clip}/{i:03d}.png", "wb") as f:
                f.write(buf.getvalue())
        answer = "It gets brighter." if clip % 2 else "It stays dark."
        conversation = [
            {"from": "human", "value": "<video>\nWhat happens?"},
            {"from": "gpt", "value": answer},
        ]
        records.append({"id": f"clip{clip}", "video": f"videos/clip{clip}", "conversations": conversation})
    with fsspec.open(f"{root}/train.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_plan(LLAVA / "llava_next_video.yaml", check_model=False).cfg
    words = " ".join(t["value"] for r in records for t in r["conversations"]) + " " + cfg.data.template.system
    tokenizer = tmp_path / "tokenizer"
    build_word_tokenizer(words.replace("<video>", " ").split()).save_pretrained(tokenizer)
    node = f"{{name: llava, annotations: '{root}/train.jsonl', max_frames: 4}}"
    overrides = [
        f"data.train={node}",
        f"data.val={node}",
        f"data.tokenizer={tokenizer}",
        "data.batch_size=2",
        "trainer.max_steps=2",
        f"output_dir={tmp_path / 'runs'}",
    ]
    plan = load_plan(LLAVA / "mini" / "llava_next_video.yaml", overrides)
    model, datamodule = build_parts(plan.cfg, plan.tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["images"].shape == (2 * 4, 3, 48, 48)  # 2 videos x 4 frames, one 48 px view each
    assert int((batch["input_ids"] == model.image_token_id).sum()) == 2 * 4 * 16  # 16 tokens per frame
    assert main(["train", str(LLAVA / "mini" / "llava_next_video.yaml"), *overrides]) == 0
    assert "train/loss=" in capsys.readouterr().out
