"""Training from LLaVA-format files: a small dataset (single image, multi-image, multi-turn, video frames,
text only) written to ``memory://`` and into a zip archive, trained for 5 steps from each through
``toolkit.train.train``, with labels checked to be exactly the assistant answers.

The ``llava`` dataset has no built-in vocabulary (its words are the data's), so the offline word-level
tokenizer cannot be built from the config (``data.tokenizer: null`` is refused with a message saying so); the
tests do what a user without a downloaded tokenizer does: build a word-level tokenizer over the data's words,
save it, and point ``data.tokenizer`` at the folder.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from pathlib import Path

import fsspec
import pytest
import yaml
from PIL import Image

from tests.conftest import TINY_MODEL
from toolkit.data.markup import IMAGE

VIDEO = "<video>"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (250, 250, 250)}


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def human(value: str) -> dict[str, str]:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict[str, str]:
    return {"from": "gpt", "value": value}


FILES = {f"images/{name}.png": png(rgb) for name, rgb in COLORS.items()}
FILES.update({f"videos/clip/{i:03d}.png": png((i * 25, i * 25, i * 25)) for i in range(1, 7)})
RECORDS = [
    {
        "id": "single",
        "image": "images/red.png",
        "conversations": [human(f"{IMAGE}\nWhat color is it?"), gpt("Red.")],
    },
    {
        "id": "multi",
        "image": ["images/green.png", "images/blue.png"],
        "conversations": [human(f"{IMAGE} {IMAGE}\nWhich one is blue?"), gpt("The second one.")],
    },
    {
        "id": "multiturn",
        "image": "images/white.png",
        "conversations": [
            human(f"{IMAGE}\nWhat is this?"),
            gpt("A white square."),
            human("Is it red?"),
            gpt("No, it is white."),
        ],
    },
    {
        "id": "video",
        "video": "videos/clip",
        "conversations": [human(f"{VIDEO}\nWhat happens?"), gpt("It gets brighter.")],
    },
    {
        "id": "text",
        "conversations": [human("Who are you?"), gpt("A small model."), human("Thanks."), gpt("Welcome.")],
    },
]
N_IMAGES = {"single": 1, "multi": 2, "multiturn": 1, "video": 4, "text": 0}  # the video: max_frames 4 of 6


def words() -> list[str]:
    text = " ".join(t["value"] for r in RECORDS for t in r["conversations"])
    return text.replace(IMAGE, " ").replace(VIDEO, " ").split()


def write_memory() -> str:
    root = f"memory://llava-train-{uuid.uuid4().hex}"
    for rel, data in {**FILES, "train.jsonl": _jsonl()}.items():
        with fsspec.open(f"{root}/{rel}", "wb") as f:
            f.write(data)
    return f"{root}/train.jsonl"


def write_zip(tmp_path: Path) -> str:
    archive = tmp_path / "llava.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for rel, data in {**FILES, "train.json": json.dumps(RECORDS).encode()}.items():  # a JSON list here
            z.writestr(f"llava/{rel}", data)
    return f"zip://llava/train.json::{archive}"


def _jsonl() -> bytes:
    return "".join(json.dumps(r) + "\n" for r in RECORDS).encode()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from toolkit.data.tokenizer import build_word_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_word_tokenizer(words()).save_pretrained(path)
    return str(path)


def experiment(tmp_path: Path, annotations: str, tokenizer: str | None) -> Path:
    node = {"name": "llava", "annotations": annotations, "max_frames": 4}
    cfg = {
        "model": TINY_MODEL,
        "data": {
            "train": node,
            "val": node,
            "tokenizer": tokenizer,
            "batch_size": 2,
            "max_length": 160,
        },
        "optim": {"lr": 3e-3},
        "trainer": {
            "max_steps": 5,
            "val_check_interval": 5,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
        },
        "checkpoint": {"every_n_steps": 5},
        "output_dir": str(tmp_path / "runs"),
        "tracking": {"experiment": "llava-files"},
    }
    path = tmp_path / f"llava-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("where", ["memory", "zip"])
def test_trains_five_steps_from_llava_files(tmp_path, tokenizer_dir, where):
    from toolkit.train import train

    annotations = write_memory() if where == "memory" else write_zip(tmp_path)
    result = train(experiment(tmp_path, annotations, tokenizer_dir))
    metrics = result.stages[0].metrics
    assert result.stages[0].global_step == 5
    assert result.run_id and result.tracking_uri.startswith("sqlite:///")
    assert metrics["val/loss"] == pytest.approx(metrics["val/loss"])  # a number, not NaN
    assert 0.0 <= metrics["val/acc"] <= 1.0


def test_a_word_level_tokenizer_needs_a_vocabulary(tmp_path):
    """With data.tokenizer null the toolkit would build a word-level tokenizer from the datasets' vocabulary;
    llava has none, and the error says what to do."""
    from toolkit.errors import ChimeraError
    from toolkit.plan import load_plan

    with pytest.raises(ChimeraError, match="dataset 'llava' has no built-in vocabulary.*set data.tokenizer"):
        load_plan(experiment(tmp_path, write_memory(), None))


def _expected_target_positions(ids: list[int], tok, answers: list[str]) -> list[int]:
    """Positions of each answer's tokens and its ``</s>`` right after each `` ASSISTANT:`` (vicuna_v1), found in
    the input ids independently of the template's mask."""
    prompt = tok(" ASSISTANT:", add_special_tokens=False)["input_ids"]
    starts = [i + len(prompt) for i in range(len(ids)) if ids[i : i + len(prompt)] == prompt]
    assert len(starts) == len(answers)
    out = []
    for start, answer in zip(starts, answers):
        span = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids[start : start + len(span)] == span
        out += range(start, start + len(span))
    return out


@pytest.mark.parametrize("layout", ["longllava", "llava"])
def test_labels_are_exactly_the_assistant_spans(tokenizer_dir, layout):
    from toolkit import registry
    from toolkit.data.collate import IGNORE_INDEX, Collator
    from toolkit.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    data = registry.build(
        "dataset",
        {"name": "llava", "annotations": write_memory(), "max_frames": 4},
        "data.train",
        image_size=16,
    )
    samples = [data[i] for i in range(len(data))]
    assert [s["id"] for s in samples] == list(N_IMAGES)
    K = 3
    from toolkit.data.vision import VisionProcessor

    vision = VisionProcessor.plain(16, K)  # the llava dataset hands Pillow images to the vision path
    batch = Collator(tok, K, 512, template={"name": "vicuna_v1", "layout": layout}, vision=vision)(samples)
    assert batch["images"].shape[0] == sum(N_IMAGES.values())
    image_id = tok.convert_tokens_to_ids(IMAGE)
    for i, sample in enumerate(samples):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        n = int(batch["attention_mask"][i].sum())
        assert ids.count(image_id) == K * N_IMAGES[sample["id"]]
        answers = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
        expected = _expected_target_positions(ids[:n], tok, answers)
        assert [p for p, lab in enumerate(labels) if lab != IGNORE_INDEX] == expected, sample["id"]
        assert all(labels[p] == ids[p] for p in expected)
        img_markup = {tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>")}
        n_markup = sum(t in img_markup for t in ids[:n])
        assert n_markup == (2 * N_IMAGES[sample["id"]] if layout == "longllava" else 0)
