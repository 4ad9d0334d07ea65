"""LLaVA-format records with an AnyRes image and videos (a frame folder, and a video file when PyAV is
installed) train a few steps on CPU through ``toolkit.train.train``, with AnyRes on and a token budget."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import TINY_MODEL
from toolkit.data.markup import IMAGE

HAS_AV = importlib.util.find_spec("av") is not None
WORDS = ["what", "color", "?", "red", "blue", "happens", "brighter", "then"]
N_FILE_FRAMES = 10


def human(value: str) -> dict[str, str]:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict[str, str]:
    return {"from": "gpt", "value": value}


def png(rgb: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_video(path: Path) -> None:
    """An MPEG-4 file of ``N_FILE_FRAMES`` flat grey frames, frame i at level 25 i."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(N_FILE_FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 25 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_data(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "wide.png").write_bytes(png((200, 30, 30), (48, 20)))  # AnyRes: 1x3 tiles of 16
    (root / "images" / "tall.png").write_bytes(png((30, 30, 200), (20, 40)))
    clip = root / "videos" / "clip"
    clip.mkdir(parents=True)
    for i in range(1, 7):
        (clip / f"{i:03d}.png").write_bytes(png((i * 30, i * 30, i * 30), (24, 24)))
    records = [
        {
            "id": "wide",
            "image": "images/wide.png",
            "conversations": [human(f"{IMAGE}\nwhat color ?"), gpt("red")],
        },
        {
            "id": "tall",
            "image": "images/tall.png",
            "conversations": [human(f"{IMAGE}\nwhat color ?"), gpt("blue")],
        },
        {
            "id": "frames",
            "video": "videos/clip",
            "conversations": [human("<video>\nwhat happens ?"), gpt("brighter")],
        },
        {
            "id": "both",
            "image": "images/wide.png",
            "video": "videos/clip",
            "conversations": [human(f"<video> then {IMAGE}\nwhat color ?"), gpt("red")],
        },
    ]
    if HAS_AV:
        write_video(root / "videos" / "movie.mp4")
        records.append(
            {
                "id": "file",
                "video": "videos/movie.mp4",
                "conversations": [human("<video>\nwhat happens ?"), gpt("brighter")],
            }
        )
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.skipif(not HAS_AV, reason="PyAV (the 'video' extra) is not installed")
def test_video_file_frames_are_sampled_uniformly(tmp_path) -> None:
    from components.datasets.llava import LlavaDataset

    path = write_data(tmp_path)
    ds = LlavaDataset(str(path), max_frames=4)
    sample = ds[4]
    assert sample["id"] == "file" and sample["frames"] == [[0, 1, 2, 3]]
    levels = [
        float(np.asarray(im).mean()) for im in sample["images"]
    ]  # frames 0, 3, 6, 9 (linspace, rounded)
    assert all(im.size == (32, 32) for im in sample["images"])
    assert levels == pytest.approx([0, 75, 150, 225], abs=6)  # lossy codec: within a few levels
    assert sample["conversations"][0]["value"] == " ".join([IMAGE] * 4) + "\nwhat happens ?"


@pytest.mark.parametrize("layout", ["llava_next", "longllava"])
def test_anyres_and_video_records_train_on_cpu(tmp_path, layout) -> None:
    from toolkit.data.tokenizer import build_word_tokenizer
    from toolkit.train import train

    annotations = write_data(tmp_path / "data")
    tokenizer = tmp_path / "tokenizer"
    build_word_tokenizer(WORDS).save_pretrained(tokenizer)
    node = {"name": "llava", "annotations": str(annotations), "max_frames": 6}
    cfg = {
        "model": {**TINY_MODEL, "vision": {"anyres": True, "layout": layout}},
        "data": {
            "train": node,
            "val": node,
            "tokenizer": str(tokenizer),
            "batch_size": 2,
            "max_length": 160,
            "preprocess": "pad",
            # 4 tokens per view: 6 frames (24 tokens) are over, so are 6 frames + the 1x3 AnyRes image (14 tokens
            # in llava_next): videos keep 5 (alone) or 2 frames; 'wide' (14) and 'tall' (16) fit
            "max_image_tokens": 22,
            "over_budget": "fewer_frames",
        },
        "optim": {"lr": 3e-3, "trainable": ["connector.*", "decoder.*", "image_newline.*"]},
        "trainer": {
            "max_steps": 3,
            "val_check_interval": 3,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
        },
        "checkpoint": {"every_n_steps": 3},
        "output_dir": str(tmp_path / "runs"),
        "tracking": {"experiment": "vision-files"},
    }
    path = tmp_path / f"vision-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = train(path)
    stage = result.stages[0]
    assert stage.global_step == 3
    assert math.isfinite(stage.metrics["val/loss"])
    assert (
        stage.metrics["data/over_budget"] >= 2
    )  # at least 2 of the first 4 samples of an epoch hold a video


def test_the_vision_path_runs_in_loader_workers(tmp_path) -> None:
    """Two worker processes give the batches the main process gives (views, layout, ids): the processor
    pickles and runs where the collator runs."""
    import torch

    from toolkit.data.datamodule import ChimeraDataModule
    from toolkit.data.tokenizer import build_word_tokenizer, image_token_id
    from toolkit.data.vision import VisionProcessor
    from toolkit.model import build_model

    annotations = write_data(tmp_path)
    tok = build_word_tokenizer(WORDS)
    model = build_model(
        {**TINY_MODEL, "vision": {"anyres": True, "frame_stride": 2}},
        vocab_size=len(tok),
        image_token_id=image_token_id(tok),
    )
    vision = VisionProcessor(model.token_plan, model.encoder.data_config, preprocess="pad")

    def batches(workers: int) -> list[dict]:
        dm = ChimeraDataModule(
            {"name": "llava", "annotations": str(annotations), "max_frames": 4},
            tokenizer=tok,
            image_tokens=model.image_tokens,
            image_size=16,
            batch_size=2,
            num_workers=workers,
            vision=vision,
        )
        return list(dm.train_dataloader())

    for a, b in zip(batches(0), batches(2), strict=True):
        for key in ("input_ids", "images", "image_layout", "n_over_budget"):
            assert torch.equal(a[key], b[key]), key
        model(b["input_ids"], b["images"], image_layout=b["image_layout"])
