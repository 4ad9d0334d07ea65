"""Any registered dataset on disk in the LLaVA format: ``data.jsonl`` + PNGs (``chimera data export``).

Layout of ``out_dir``::

    data.jsonl   one record per sample, in index order:
                 {"id": ..., "image": ["images/00000/0000000_0000.png", ...], "conversations": [...]}
                 ("image" is always a list, relative to out_dir; absent for a text-only sample)
    images/      PNG files (RGB, 8 bits per channel), at most 1000 per sub-folder
    meta.json    the dataset node, image_size, counts and the dataset's chance accuracy when it has one

The ``llava`` dataset (``components/datasets/llava.py``) reads it back with ``annotations: OUT/data.jsonl``
(image paths resolve against the annotation file's folder).

Quantisation: a PNG stores uint8, so each pixel value x in [0, 1] is written as round(255 x) and reads back
as round(255 x) / 255, within 1/510 of x. The generators that are meant to be exported (``scenes``) already
quantise their pixels to multiples of 1/255, so for them the round trip is exact: the same ids, the same
conversations in the same order and bit-identical image tensors, hence the same batches through the same
collator and sampler. A dataset with arbitrary floats comes back within 1/510 per pixel.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from toolkit import registry
from toolkit.errors import ChimeraError

FILES_PER_FOLDER = 1000
ANNOTATIONS = "data.jsonl"
IMAGES = "images"
META = "meta.json"


def to_png(image: torch.Tensor, compress_level: int = 1) -> bytes:
    """FloatTensor[3, H, W] in [0, 1] -> PNG bytes (RGB, uint8 = round(255 x), values clamped to [0, 1])."""
    from PIL import Image

    pixels = image.detach().float().clamp(0.0, 1.0).mul(255).round().to(torch.uint8)  # [3, H, W]
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB").save(
        buffer, format="PNG", compress_level=compress_level
    )
    return buffer.getvalue()


class _Encoded(torch.utils.data.Dataset):
    """A dataset whose samples come out as (record without paths, PNG bytes per image): PNG encoding runs in
    DataLoader workers."""

    def __init__(self, dataset: Any, where: str):
        self.dataset, self.where = dataset, where

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[dict[str, Any], list[bytes]]:
        sample = self.dataset[index]
        sid = sample.get("id", index) if isinstance(sample, Mapping) else index
        if not isinstance(sample, Mapping) or not isinstance(sample.get("conversations"), list):
            raise ChimeraError(f"{self.where} sample {sid}: expected a mapping with a 'conversations' list")
        images = sample.get("images")
        if images is None:
            images = []
        elif isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ChimeraError(
                    f"{self.where} sample '{sid}': 'images' must be [n, 3, H, W], got {tuple(images.shape)}"
                )
            images = list(images)
        record = {"id": str(sid), "conversations": [dict(turn) for turn in sample["conversations"]]}
        return record, [to_png(image) for image in images]


def _first(batch: list[Any]) -> Any:
    return batch[0]


def export(
    node: Mapping[str, Any] | str,
    out_dir: str | os.PathLike,
    image_size: int,
    *,
    limit: int | None = None,
    workers: int = 0,
    overwrite: bool = False,
    where: str = "dataset",
) -> Path:
    """Build the dataset ``node`` (``{name: ..., **kwargs}``, as under ``data.train``) and write it to
    ``out_dir`` in the LLaVA format (see the module docstring); returns the path of ``data.jsonl``.

    Args:
        node: a registered dataset node (a name alone builds it with its defaults).
        out_dir: the folder to write; created if missing. It must be empty or hold a previous export (with
            ``overwrite=True``, whose ``data.jsonl``, ``meta.json`` and ``images/`` are replaced).
        image_size: the derived ``image_size`` the dataset is built with (the encoder's input side).
        limit: export only the first ``limit`` samples.
        workers: DataLoader worker processes that build samples and encode PNGs (0: in this process).
        overwrite: replace a previous export in ``out_dir``.
        where: the config key naming ``node`` in error messages.

    ``data.jsonl`` is written last (to a temporary name, then renamed), so a folder that has one holds a
    complete export.
    """
    out = Path(out_dir)
    annotations = out / ANNOTATIONS
    if out.exists() and not out.is_dir():
        raise ChimeraError(f"export: '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        ours = {ANNOTATIONS, META, IMAGES, ANNOTATIONS + ".tmp"}
        if not overwrite:
            raise ChimeraError(f"export: '{out}' is not empty; choose an empty folder (or overwrite=True)")
        strangers = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if strangers:
            raise ChimeraError(
                f"export: '{out}' holds more than a previous export ({', '.join(strangers[:5])}); "
                "refusing to overwrite it"
            )
        for name in (ANNOTATIONS, META, ANNOTATIONS + ".tmp"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / IMAGES, ignore_errors=True)
    if limit is not None and int(limit) < 1:
        raise ChimeraError(f"export: limit must be >= 1, got {limit}")
    if int(workers) < 0:
        raise ChimeraError(f"export: workers must be >= 0, got {workers}")

    dataset = registry.build("dataset", node, where, image_size=int(image_size))
    count = len(dataset) if limit is None else min(int(limit), len(dataset))
    encoded = _Encoded(dataset, where)
    if count < len(dataset):
        encoded = torch.utils.data.Subset(encoded, range(count))
    loader = torch.utils.data.DataLoader(
        encoded, batch_size=1, shuffle=False, num_workers=int(workers), collate_fn=_first
    )

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (ANNOTATIONS + ".tmp")
    n_images = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for i, (record, pngs) in enumerate(loader):
            paths = []
            for j, png in enumerate(pngs):
                rel = f"{IMAGES}/{n_images // FILES_PER_FOLDER:05d}/{i:07d}_{j:04d}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(png)
                paths.append(rel)
                n_images += 1
            row = {"id": record["id"]}
            if paths:
                row["image"] = paths
            row["conversations"] = record["conversations"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    name, kwargs = registry.split_node(node, "dataset", where)
    meta = {
        "format": "llava",
        "annotations": ANNOTATIONS,
        "dataset": {"name": name, **kwargs},
        "image_size": int(image_size),
        "samples": count,
        "images": n_images,
        "pixels": "uint8 PNG, value = round(255 x); reads back as uint8 / 255",
    }
    chance = getattr(dataset, "chance", None)
    if isinstance(chance, (int, float)):
        meta["chance"] = float(chance)
    (out / META).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, annotations)
    return annotations
