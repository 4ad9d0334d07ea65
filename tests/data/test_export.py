"""``toolkit.data.export``: LLaVA-format JSONL + PNG files that read back as the same samples and batches."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from toolkit import registry
from toolkit.data.export import export, to_png
from toolkit.errors import ChimeraError

SCENES = {"name": "scenes", "task": "retrieval", "images_per_sample": 3, "size": 6, "seed": 3}


class FloatImages(Dataset):
    """Unquantised random images; every third sample is text only."""

    def __init__(self, size: int = 4, image_size: int = 8):
        self.size, self.image_size = size, image_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        n = 0 if index % 3 == 0 else 1 + index % 2
        text = " ".join(["<image>"] * n) + "\nwhat is this ?" if n else "say something ."
        return {
            "id": f"float-{index}",
            "images": torch.rand(n, 3, self.image_size, self.image_size, generator=g) if n else None,
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "a pattern"}],
        }


@pytest.fixture
def float_images(monkeypatch) -> str:
    """``FloatImages`` registered as a dataset for one test only (the registry is left as it was)."""
    name = "test_export_floats"
    entry = registry.Entry("dataset", name, FloatImages, module=__name__)
    registry.discover()
    monkeypatch.setitem(registry._REGISTRY["dataset"], name, entry)
    return name


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pixels(images) -> torch.Tensor:
    """The llava dataset's Pillow images (native size) as ``[n, 3, H, W]`` floats."""
    from torchvision.transforms.functional import to_tensor

    return torch.stack([to_tensor(im) for im in images])


def llava(annotations: Path, image_size: int):
    node = {"name": "llava", "annotations": str(annotations)}
    return registry.build("dataset", node, "data.train", image_size=image_size)


def test_export_writes_jsonl_pngs_and_meta(tmp_path: Path):
    out = tmp_path / "retrieval"
    path = export(SCENES, out, image_size=16)
    assert path == out / "data.jsonl"
    source = registry.build("dataset", SCENES, "data.train", image_size=16)
    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == [source[i]["id"] for i in range(len(source))]
    for i, row in enumerate(rows):
        assert set(row) == {"id", "image", "conversations"}
        assert row["conversations"] == source[i]["conversations"]
        assert len(row["image"]) == 3
        for j, rel in enumerate(row["image"]):
            assert not Path(rel).is_absolute() and rel.endswith(".png")
            with Image.open(out / rel) as png:
                assert png.format == "PNG" and png.mode == "RGB" and png.size == (16, 16)
                pixels = torch.from_numpy(np.array(png)).permute(2, 0, 1).float() / 255
            assert torch.equal(pixels, source[i]["images"][j])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dataset"] == SCENES and meta["image_size"] == 16
    assert meta["samples"] == 6 and meta["images"] == 18
    assert meta["chance"] == pytest.approx(1 / 3)
    assert not (out / "data.jsonl.tmp").exists()


def test_scenes_round_trip_through_the_llava_dataset_exactly(tmp_path: Path):
    path = export(SCENES, tmp_path / "out", image_size=16)
    source = registry.build("dataset", SCENES, "data.train", image_size=16)
    back = llava(path, 16)
    assert len(back) == len(source)
    for i in range(len(source)):
        a, b = source[i], back[i]
        assert a["id"] == b["id"] and a["conversations"] == b["conversations"]
        assert torch.equal(a["images"], pixels(b["images"]))  # the generator quantises to uint8 levels


def test_the_exported_data_yields_the_same_batches(tmp_path: Path):
    """Same samples in the same order through the real datamodule (sampler + collator) -> equal batches."""
    from components.datasets.scenes import Scenes
    from toolkit.data.datamodule import ChimeraDataModule
    from toolkit.data.tokenizer import build_word_tokenizer

    node = {"name": "scenes", "task": "spatial", "size": 12, "seed": 5}
    path = export(node, tmp_path / "spatial", image_size=16)
    tok = build_word_tokenizer(Scenes.vocabulary())

    def batches(train):
        dm = ChimeraDataModule(train, tokenizer=tok, image_tokens=4, image_size=16, batch_size=4, seed=1)
        return list(dm.train_dataloader())

    for a, b in zip(batches(node), batches({"name": "llava", "annotations": str(path)}), strict=True):
        for key in ("input_ids", "labels", "attention_mask", "images"):
            assert torch.equal(a[key], b[key]), key


def test_unquantised_images_come_back_within_half_a_level_and_text_only_has_no_image(
    tmp_path: Path, float_images: str
):
    node = {"name": float_images, "size": 5}
    path = export(node, tmp_path / "floats", image_size=8)
    rows = read_jsonl(path)
    assert "image" not in rows[0] and "image" not in rows[3]
    assert [len(r.get("image", [])) for r in rows] == [0, 2, 1, 0, 1]
    source = registry.build("dataset", node, "data.train", image_size=8)
    back = llava(path, 8)
    for i in range(len(source)):
        a, b = source[i], back[i]
        assert a["conversations"] == b["conversations"]
        if a["images"] is None:
            assert b["images"] is None
        else:
            assert (a["images"] - pixels(b["images"])).abs().max() <= 0.5 / 255 + 1e-6


def test_limit_and_workers(tmp_path: Path):
    one = export(SCENES, tmp_path / "a", image_size=8, limit=4)
    two = export(SCENES, tmp_path / "b", image_size=8, limit=4, workers=2)
    assert len(read_jsonl(one)) == 4
    assert one.read_text() == two.read_text()
    for row in read_jsonl(one):
        for rel in row["image"]:
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_images_are_spread_over_folders_of_at_most_1000(tmp_path: Path):
    node = {"name": "scenes", "task": "needle", "images_per_sample": 700, "size": 2}
    path = export(node, tmp_path / "needle", image_size=8)
    paths = [rel for row in read_jsonl(path) for rel in row["image"]]
    assert len(paths) == len(set(paths)) == 1400
    folders = {rel.split("/")[1] for rel in paths}
    assert folders == {"00000", "00001"}
    assert all(len(list((tmp_path / "needle" / "images" / f).iterdir())) <= 1000 for f in folders)


def test_refuses_a_non_empty_folder_unless_overwriting_a_previous_export(tmp_path: Path):
    out = tmp_path / "out"
    export(SCENES, out, image_size=8, limit=2)
    with pytest.raises(ChimeraError, match="not empty"):
        export(SCENES, out, image_size=8)
    path = export({**SCENES, "seed": 4}, out, image_size=8, limit=3, overwrite=True)
    rows = read_jsonl(path)
    assert len(rows) == 3 and rows[0]["id"].endswith("-4-0")
    assert len(list(out.rglob("*.png"))) == 9  # the previous export's images are gone
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ChimeraError, match="refusing to overwrite"):
        export(SCENES, out, image_size=8, overwrite=True)
    assert (out / "notes.txt").exists() and (out / "data.jsonl").exists()


def test_bad_node_is_a_user_error(tmp_path: Path):
    with pytest.raises(ChimeraError, match="data.train"):
        export({"name": "scenes", "task": "nope"}, tmp_path / "x", image_size=8, where="data.train")
    with pytest.raises(ChimeraError, match="unknown dataset"):
        export({"name": "no_such_dataset"}, tmp_path / "y", image_size=8)


def test_to_png_rounds_to_the_nearest_level():
    image = torch.tensor([0.0, 0.5 / 255 - 1e-4, 1.0, 1.2]).reshape(1, 2, 2).expand(3, 2, 2)
    with Image.open(io.BytesIO(to_png(image))) as png:
        assert np.array(png).reshape(4, 3).tolist() == [[0] * 3, [0] * 3, [255] * 3, [255] * 3]
