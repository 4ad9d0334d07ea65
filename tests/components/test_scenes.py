"""``scenes``: determinism, shapes, vocabulary, chance accuracy, and answers that agree with the pixels."""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from components.datasets.scenes import (
    DIRECTIONS,
    MULTI_IMAGE_TASKS,
    REGIONS,
    SINGLE_IMAGE_TASKS,
    TASKS,
    Scenes,
)
from components.datasets.synthetic_shapes import COLORS, SHAPES
from toolkit import registry
from toolkit.data.collate import encode
from toolkit.data.markup import IMAGE
from toolkit.data.tokenizer import build_word_tokenizer, split_words
from toolkit.data.vocabulary import dataset_vocabulary
from toolkit.errors import ChimeraError

PALETTE = torch.tensor(list(COLORS.values()))  # [6, 3]
NAMES = list(COLORS)
# One configuration per task (N = images per sample).
CONFIGS = {
    "caption": 1,
    "position": 1,
    "spatial": 1,
    "count_objects": 1,
    "retrieval": 5,
    "ordering": 5,
    "counting": 6,
    "needle": 7,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Many small tensor ops: intra-op threads only add contention on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(task: str, n: int | None = None, **kwargs) -> Scenes:
    n = CONFIGS[task] if n is None else n
    image_size = kwargs.pop("image_size", 16)
    node = {"name": "scenes", "task": task, "images_per_sample": n, **kwargs}
    return registry.build("dataset", node, "data.train", image_size=image_size)


def question(sample) -> str:
    return sample["conversations"][0]["value"]


def answer(sample) -> str:
    return sample["conversations"][1]["value"]


# -- pixels -> objects ------------------------------------------------------------------------------------


def objects_in(image: torch.Tensor) -> dict[str, torch.Tensor]:
    """{colour: bool mask [S, S]} of the palette colours drawn in ``image`` [3, S, S].

    Each pixel takes the nearest of the six palette colours and the background grey (L1); a pixel is kept
    when at least half of its 3x3 neighbourhood agrees (removes noise specks). Colours with fewer than 4
    pixels are treated as absent.
    """
    background = image.flatten(1).median(dim=1).values  # [3]
    refs = torch.cat([PALETTE, background[None]])  # [7, 3]
    distance = (image[None] - refs[:, :, None, None]).abs().sum(1)  # [7, S, S]
    onehot = F.one_hot(distance.argmin(0), len(refs)).permute(2, 0, 1).float()  # [7, S, S]
    agree = F.avg_pool2d(onehot[None], 3, stride=1, padding=1, count_include_pad=False)[0]  # [7, S, S]
    masks = (onehot > 0) & (agree >= 0.5)
    return {name: masks[k] for k, name in enumerate(NAMES) if int(masks[k].sum()) >= 4}


def box_centre(mask: torch.Tensor) -> tuple[float, float]:
    """(cx, cy) of the mask's bounding box, as fractions of the side (every shape is centred in its box)."""
    ys, xs = mask.nonzero(as_tuple=True)
    S = mask.shape[0]
    return (float(xs.min() + xs.max() + 1) / 2 / S, float(ys.min() + ys.max() + 1) / 2 / S)


def classify_shape(mask: torch.Tensor) -> str:
    """Square fills its box, a circle ~pi/4, triangle and cross ~1/2 (the triangle is bottom-heavy)."""
    ys, xs = mask.nonzero(as_tuple=True)
    top, height = int(ys.min()), int(ys.max()) - int(ys.min()) + 1
    fill = mask.sum().item() / (height * (int(xs.max()) - int(xs.min()) + 1))
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    centroid = (ys.float().mean().item() - top + 0.5) / height
    return "triangle" if centroid > 0.58 else "cross"


# -- determinism and shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_in_seed_split_and_index(task):
    a, b = make(task, size=6), make(task, size=6)
    for i in (0, 5):
        x, y = a[i], b[i]
        assert x["id"] == y["id"] and x["conversations"] == y["conversations"]
        assert torch.equal(x["images"], y["images"])
    val = make(task, size=6, split="val")
    other_seed = make(task, size=6, seed=1)
    assert not torch.equal(a[0]["images"], val[0]["images"])
    assert not torch.equal(a[0]["images"], other_seed[0]["images"])
    assert not torch.equal(a[0]["images"], a[1]["images"])
    # __getitem__ draws exactly what layout() describes
    layout = a.layout(3)
    sample = a[3]
    assert question(sample).endswith(layout.question) and answer(sample) == layout.answer
    assert sample["images"].shape[0] == len(layout.images)


@pytest.mark.parametrize("task", TASKS)
def test_sample_format(task):
    n = CONFIGS[task]
    ds = make(task, size=4, image_size=24)
    sample = ds[2]
    images = sample["images"]
    assert sample["id"] == f"scenes-{task}-train-0-2"
    assert images.shape == (n, 3, 24, 24) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    # quantised to uint8 levels, so a PNG export reads back exactly
    assert torch.equal(images, (images * 255).round() / 255)
    human = question(sample)
    assert human.count(IMAGE) == n and human.startswith(" ".join([IMAGE] * n) + "\n")
    assert [t["from"] for t in sample["conversations"]] == ["human", "gpt"]
    with pytest.raises(IndexError):
        ds[4]


# -- vocabulary ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_every_generated_word_is_in_the_vocabulary(task):
    vocabulary = set(Scenes.vocabulary())
    assert vocabulary == set(dataset_vocabulary({"name": "scenes", "task": task}))
    sizes = [CONFIGS[task]] if task in SINGLE_IMAGE_TASKS else [2, 3, 12, 40]
    for n in sizes:
        ds = make(task, n, size=300, objects=[1, 3])
        words = set()
        for i in range(len(ds)):
            layout = ds.layout(i)
            words.update(split_words([layout.question, layout.answer]))
        assert words <= vocabulary, sorted(words - vocabulary)
    # and through the real tokenizer: no <unk>
    tok = build_word_tokenizer(Scenes.vocabulary())
    sample = make(task, size=3)[1]
    ids = encode(sample, tok, image_tokens=2, max_length=10_000)["input_ids"]
    assert tok.unk_token_id not in ids.tolist()


# -- chance accuracy ---------------------------------------------------------------------------------------


def answers_of(ds: Scenes, n: int) -> Counter:
    """Answers as a model that reads the question (not the images) sees them: for ``ordering``, the order as
    positions in the question's list of items (the items themselves are named in the question)."""
    counts = Counter()
    for i in range(n):
        layout = ds.layout(i)
        if ds.task == "ordering":
            items = [" ".join(part.split()[:2]) for part in layout.question.split(" the ")[1:]]
            counts[tuple(items.index(item) for item in layout.answer.split(" then "))] += 1
        else:
            counts[layout.answer] += 1
    return counts


@pytest.mark.parametrize(
    "task,n,objects",
    [
        ("caption", 1, [1, 1]),
        ("position", 1, [1, 3]),
        ("spatial", 1, [1, 3]),
        ("count_objects", 1, [1, 4]),
        ("count_objects", 1, [2, 2]),
        ("retrieval", 2, [1, 3]),
        ("retrieval", 7, [1, 3]),
        ("ordering", 2, [1, 3]),
        ("ordering", 9, [1, 3]),
        ("counting", 3, [1, 3]),
        ("counting", 50, [1, 3]),
        ("needle", 4, [1, 3]),
    ],
)
def test_chance_matches_the_answer_distribution(task, n, objects):
    """Answers are uniform over 1 / chance values (given the question): each one's frequency is within 5 sigma
    of ``chance``."""
    ds = make(task, n, size=600, objects=objects)
    chance = ds.chance
    assert chance == Scenes.chance_accuracy(task, n, objects)
    counts = answers_of(ds, len(ds))
    assert len(counts) == round(1 / chance)
    sigma = math.sqrt(chance * (1 - chance) / len(ds))
    for ans, c in counts.items():
        assert abs(c / len(ds) - chance) <= 5 * sigma + 1e-9, (ans, c / len(ds), chance)


def test_chance_values():
    assert Scenes.chance_accuracy("position") == pytest.approx(1 / 9)
    assert Scenes.chance_accuracy("spatial") == pytest.approx(1 / 4)
    assert Scenes.chance_accuracy("count_objects", objects=[1, 3]) == pytest.approx(1 / 3)
    assert Scenes.chance_accuracy("retrieval", 1000) == pytest.approx(1 / 1000)
    assert Scenes.chance_accuracy("ordering", 2) == pytest.approx(1 / 2)
    assert Scenes.chance_accuracy("ordering", 10) == pytest.approx(1 / 6)
    assert Scenes.chance_accuracy("counting", 2) == pytest.approx(1 / 2)
    assert Scenes.chance_accuracy("counting", 1000) == pytest.approx(1 / 4)
    assert Scenes.chance_accuracy("needle", 1000) == pytest.approx(1 / 4)
    assert Scenes.chance_accuracy("caption", objects=[1, 1]) == pytest.approx(1 / 24)
    assert Scenes.chance_accuracy("caption", objects=[1, 3]) == pytest.approx(1 / (3 * 24))


def test_caption_chance_is_the_most_likely_caption():
    """With 1..3 objects, the likeliest captions are the 24 one-object ones, each (1/3) / 24."""
    ds = make("caption", size=1500, objects=[1, 3])
    counts = answers_of(ds, len(ds))
    single = {a: c for a, c in counts.items() if " and " not in a}
    assert len(single) == len(COLORS) * len(SHAPES)
    assert sum(single.values()) / len(ds) == pytest.approx(1 / 3, abs=0.05)
    assert max(counts.values()) / len(ds) < 3 * ds.chance
    assert ds.chance == pytest.approx(1 / 72)


# -- answers agree with the pixels -------------------------------------------------------------------------

PIXEL_KW = {"image_size": 64, "radius": [0.14, 0.2]}


@pytest.mark.parametrize("task", SINGLE_IMAGE_TASKS)
def test_single_image_answers_agree_with_the_pixels(task):
    ds = make(task, size=40, objects=[1, 4], **PIXEL_KW)
    for i in range(len(ds)):
        sample, layout = ds[i], ds.layout(i)
        found = objects_in(sample["images"][0])
        (scene,) = layout.images
        # exactly the layout's colours are drawn, each centred where the layout says, with its shape
        assert set(found) == {o.color for o in scene}, (i, sorted(found), scene)
        centres = {}
        for o in scene:
            cx, cy = box_centre(found[o.color])
            assert abs(cx - o.cx) <= 1.5 / 64 and abs(cy - o.cy) <= 1.5 / 64, (i, o, cx, cy)
            assert classify_shape(found[o.color]) == o.shape, (i, o)
            centres[o.color] = (cx, cy)
        ans, q = answer(sample), question(sample)
        if task == "count_objects":
            assert ans == str(len(found))
        elif task == "caption":
            drawn = sorted(found, key=NAMES.index)
            assert ans == " and ".join(
                f"{'an' if c[0] in 'aeiou' else 'a'} {c} {classify_shape(found[c])}" for c in drawn
            )
        elif task == "position":
            color = q.split("where is the ")[1].split()[0]
            cx, cy = centres[color]
            assert ans == REGIONS[3 * min(int(cy * 3), 2) + min(int(cx * 3), 2)], (i, cx, cy)
        elif task == "spatial":
            words = q.split("\n")[1].split()
            a, b = words[3], words[-3]  # "where is the A s relative to the B s ?"
            dx = centres[a][0] - centres[b][0]
            dy = centres[a][1] - centres[b][1]
            assert abs(dx if ans in ("left", "right") else dy) > 1.5 * abs(
                dy if ans in ("left", "right") else dx
            )
            expected = (
                ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
            )
            assert ans == expected and ans in DIRECTIONS


@pytest.mark.parametrize("task", MULTI_IMAGE_TASKS)
def test_multi_image_answers_agree_with_the_pixels(task):
    ds = make(task, size=25, objects=[1, 3], **PIXEL_KW)
    for i in range(len(ds)):
        sample = ds[i]
        found = [objects_in(image) for image in sample["images"]]
        ans, q = answer(sample), question(sample).split("\n")[1]
        if task in ("retrieval", "counting"):
            color, shape = q.split(" the ")[1].split()[:2]
            having = [j for j, f in enumerate(found) if color in f]
            assert all(classify_shape(found[j][color]) == shape for j in having)
            if task == "retrieval":
                assert having == [int(ans) - 1], (i, having, ans)
            else:
                assert len(having) == int(ans), (i, having, ans)
        elif task == "ordering":
            items = [part.split()[:2] for part in q.split(" the ")[1:]]
            place = {}
            for color, shape in items:
                (j,) = [j for j, f in enumerate(found) if color in f]
                assert classify_shape(found[j][color]) == shape
                place[f"{color} {shape}"] = j
            assert ans == " then ".join(sorted(place, key=place.get))
        else:  # needle
            color = q.split()[3]
            (j,) = [j for j, f in enumerate(found) if color in f]
            assert classify_shape(found[j][color]) == ans


# -- long haystacks ----------------------------------------------------------------------------------------


def test_needle_in_a_haystack_of_1000_images():
    ds = make("needle", 1000, size=3, image_size=8)
    start = time.perf_counter()
    sample = ds[0]
    elapsed = time.perf_counter() - start
    layout = ds.layout(0)
    assert sample["images"].shape == (1000, 3, 8, 8)
    assert question(sample).count(IMAGE) == 1000
    color = layout.question.split()[3]
    holders = [j for j, scene in enumerate(layout.images) if any(o.color == color for o in scene)]
    assert len(holders) == 1
    (needle,) = [o for o in layout.images[holders[0]] if o.color == color]
    assert needle.shape == layout.answer
    assert elapsed < 5.0, f"a 1000-image sample took {elapsed:.2f} s"
    assert ds.chance == pytest.approx(1 / 4)
    # through the collator: one placeholder per image, one slot each here
    tok = build_word_tokenizer(Scenes.vocabulary())
    encoded = encode(sample, tok, image_tokens=1, max_length=4000)
    assert encoded["n_images"] == 1000 and not encoded["truncated"]


def test_single_image_samples_are_fast():
    ds = make("spatial", size=50, image_size=32, objects=[2, 4])
    ds[0]
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    per_sample = (time.perf_counter() - start) / len(ds)
    assert per_sample < 0.02, f"{per_sample * 1000:.1f} ms per sample"


# -- configuration errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"task": "retreival", "images_per_sample": 3}, "did you mean 'retrieval'"),
        ({"task": "retrieval", "images_per_sample": 1}, "images_per_sample in 2..1000"),
        ({"task": "needle", "images_per_sample": 1001}, "images_per_sample in 2..1000"),
        ({"task": "spatial", "images_per_sample": 2}, "single-image"),
        ({"task": "ordering", "images_per_sample": 5, "objects": [1, 4]}, "at most 3 objects"),
        ({"task": "caption", "objects": [0, 2]}, "1 <= min <= max"),
        ({"task": "caption", "radius": [0.1, 0.4]}, "radius"),
    ],
)
def test_bad_arguments_fail_at_config_time(kwargs, message):
    with pytest.raises(ChimeraError, match=message):
        registry.validate("dataset", {"name": "scenes", **kwargs}, "data.train", derived=("image_size",))
    with pytest.raises(ChimeraError, match=message):
        registry.build("dataset", {"name": "scenes", **kwargs}, "data.train", image_size=16)
