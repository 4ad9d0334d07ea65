"""Datasets: synthetic shapes (determinism, answers that agree with the pixels, vocabulary, chance accuracy),
the mixture, and the rule that dataset components import no trainer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from components.datasets.mixture import Mixture
from components.datasets.synthetic_shapes import COLORS, ORDINALS, SHAPES, SyntheticShapes
from tests.conftest import ROOT
from toolkit import registry
from toolkit.data.collate import encode
from toolkit.data.tokenizer import build_word_tokenizer
from toolkit.errors import ChimeraError

PALETTE = torch.tensor(list(COLORS.values()))  # [6, 3]


@pytest.fixture(autouse=True)
def one_thread():
    """The pixel checks run many small ops; intra-op threads only add contention on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def foreground(image: torch.Tensor) -> torch.Tensor:
    """Bool [S, S]: pixels far from the (median) background colour, after a 3x3 blur against noise."""
    background = image.flatten(1).median(dim=1).values  # [3]
    distance = (image - background[:, None, None]).abs().sum(0)  # [S, S]
    return F.avg_pool2d(distance[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0] > 0.3


def dominant_color(image: torch.Tensor) -> str:
    mean = image[:, foreground(image)].mean(dim=1)  # [3]
    return list(COLORS)[int((PALETTE - mean).norm(dim=1).argmin())]


def classify_shape(image: torch.Tensor) -> str:
    """Square fills its bounding box, a circle ~pi/4, triangle and cross ~1/2 (triangle is bottom-heavy)."""
    mask = foreground(image)
    ys, xs = mask.nonzero(as_tuple=True)
    top, height = int(ys.min()), int(ys.max()) - int(ys.min()) + 1
    fill = mask.sum().item() / (height * (int(xs.max()) - int(xs.min()) + 1))
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    centroid = (ys.float().mean().item() - top + 0.5) / height
    return "triangle" if centroid > 0.58 else "cross"


def question(s):
    return s["conversations"][0]["value"]


def answer(s):
    return s["conversations"][1]["value"]


def test_registered_and_built_with_derived_image_size():
    assert registry.get("dataset", "synthetic_shapes").target is SyntheticShapes
    ds = registry.build("dataset", {"name": "synthetic_shapes", "size": 3}, "data.train", image_size=24)
    assert len(ds) == 3 and ds[0]["images"].shape == (1, 3, 24, 24)
    with pytest.raises(ChimeraError, match="data.train.image_size: is derived"):
        registry.build("dataset", {"name": "synthetic_shapes", "image_size": 24}, "data.train", image_size=24)


def test_sample_format():
    ds = SyntheticShapes(size=4, image_size=16, tasks=["compare"], images_per_sample=3)
    s = ds[1]
    assert set(s) == {"id", "images", "conversations"} and isinstance(s["id"], str)
    assert s["images"].shape == (3, 3, 16, 16) and s["images"].dtype == torch.float32
    assert float(s["images"].min()) >= 0.0 and float(s["images"].max()) <= 1.0
    assert [t["from"] for t in s["conversations"]] == ["human", "gpt"]
    assert question(s).startswith("<image> <image> <image>\n")
    assert len({ds[i]["id"] for i in range(4)}) == 4


def test_deterministic_per_seed_split_and_index():
    kwargs = dict(size=50, image_size=16, tasks=["color", "shape", "caption"])
    a, b = SyntheticShapes(**kwargs), SyntheticShapes(**kwargs)
    for i in (0, 7, 49, 7):
        assert torch.equal(a[i]["images"], b[i]["images"]) and a[i]["conversations"] == b[i]["conversations"]
    val, other_seed = SyntheticShapes(split="val", **kwargs), SyntheticShapes(seed=1, **kwargs)
    for other in (val, other_seed):
        assert all(not torch.equal(a[i]["images"], other[i]["images"]) for i in range(10))
        assert [answer(a[i]) for i in range(50)] != [answer(other[i]) for i in range(50)]


def test_color_and_shape_answers_match_the_pixels():
    ds = SyntheticShapes(size=160, image_size=64, tasks=["color", "shape", "caption"])
    for i in range(len(ds)):
        s = ds[i]
        image, task = s["images"][0], ds.tasks[i % 3]
        if task == "color":
            assert question(s) == "<image>\nwhat color is the shape ?"
            assert answer(s) == dominant_color(image), s["id"]
        elif task == "shape":
            assert answer(s) == classify_shape(image), s["id"]
        else:
            assert answer(s) == f"a {dominant_color(image)} {classify_shape(image)}", s["id"]


def test_compare_answer_points_at_the_only_matching_image():
    ds = SyntheticShapes(size=60, image_size=64, tasks=["compare", "color"], images_per_sample=3)
    for i in range(0, len(ds), 2):
        s = ds[i]
        asked = question(s).split("\n")[1].removeprefix("which image shows a ").removesuffix(" ?").split()[0]
        seen = [dominant_color(im) if asked in COLORS else classify_shape(im) for im in s["images"]]
        assert seen.count(asked) == 1, (s["id"], asked, seen)
        assert answer(s) == ORDINALS[seen.index(asked)]
    s = ds[1]  # single-image questions name one of the images
    which = next(k for k, o in enumerate(ORDINALS) if f"the {o} image" in question(s))
    assert answer(s) == dominant_color(s["images"][which])


def test_questions_do_not_leak_the_answer():
    ds = SyntheticShapes(size=60, image_size=16, tasks=["color", "shape", "caption"])
    for i in range(len(ds)):
        words = set(question(ds[i]).split())
        assert not words & (set(COLORS) | set(SHAPES))


def test_vocabulary_covers_every_generated_word():
    tok = build_word_tokenizer(SyntheticShapes.vocabulary())
    for n, tasks in [(1, ["color", "shape", "caption"]), (3, ["color", "shape", "caption", "compare"])]:
        ds = SyntheticShapes(size=200, image_size=8, tasks=tasks, images_per_sample=n)
        for i in range(len(ds)):
            ids = encode(ds[i], tok, image_tokens=1, max_length=512)["input_ids"]
            assert tok.unk_token_id not in ids.tolist(), ds[i]["conversations"]
    assert set(ORDINALS) <= set(SyntheticShapes.vocabulary())


def test_chance_accuracy_numbers_and_balanced_answers():
    chance = SyntheticShapes.chance_accuracy
    assert chance(["color"]) == pytest.approx(1 / 6)
    assert chance(["shape"]) == pytest.approx(1 / 4)
    assert chance(["color", "shape"]) == pytest.approx((1 / 6 + 1 / 4) / 2)
    assert chance(["caption"]) == pytest.approx(1 / 24)
    assert chance(["compare"], images_per_sample=2) == pytest.approx(1 / 2)
    assert chance(["caption"], images_per_sample=2) == pytest.approx(1 / 24**2)
    with pytest.raises(ValueError, match="images_per_sample >= 2"):
        chance(["compare"])
    # the best constant guess on generated data is close to the stated chance
    ds = SyntheticShapes(size=1200, image_size=8, tasks=["color", "shape"])
    for task, k in (("color", 0), ("shape", 1)):
        answers = Counter(answer(ds[i]) for i in range(k, len(ds), 2))
        assert max(answers.values()) / 600 == pytest.approx(chance([task]), abs=0.05)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(tasks=["colour"]), "unknown task 'colour' \\(did you mean 'color'\\?\\)"),
        (dict(tasks=["compare"]), "'compare' needs images_per_sample >= 2"),
        (dict(images_per_sample=11), "images_per_sample must be in 1..10"),
        (dict(tasks=[]), "tasks is empty"),
    ],
)
def test_bad_arguments(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        SyntheticShapes(**kwargs)
    with pytest.raises(ChimeraError, match="data.train: dataset 'synthetic_shapes' rejected its arguments"):
        registry.build("dataset", {"name": "synthetic_shapes", **kwargs}, "data.train", image_size=32)


def test_mixture_interleaves_parts_by_weight_and_unions_vocabularies():
    parts = [
        {"name": "synthetic_shapes", "size": 10, "tasks": ["compare"], "images_per_sample": 2},
        {"name": "synthetic_shapes", "size": 4, "tasks": ["color"]},
    ]
    node = {"name": "mixture", "parts": parts, "weights": [3, 1], "size": 8, "seed": 1}
    mix = registry.build("dataset", node, "data.train", image_size=8)
    assert isinstance(mix, Mixture) and len(mix) == 8 and mix.counts == [6, 2]
    n_images = [mix[i]["images"].shape[0] for i in range(8)]
    assert sorted(n_images) == [1, 1, 2, 2, 2, 2, 2, 2] and n_images != sorted(n_images)
    assert Mixture.vocabulary(parts) == SyntheticShapes.vocabulary()
    with pytest.raises(ChimeraError, match="data.train.weights: expected 2 weights"):
        registry.validate("dataset", {**node, "weights": [1]}, "data.train")


def test_dataset_components_import_no_trainer_cli_or_transformers():
    """Components sit below the toolkit: importing them pulls in neither Lightning nor the CLI."""
    import subprocess
    import sys

    code = (
        "import sys, components.datasets, components.templates\n"
        "bad = [m for m in ('lightning', 'transformers', 'toolkit.cli', 'toolkit.train', 'toolkit.module') "
        "if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
