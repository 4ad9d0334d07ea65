"""The ``llava`` dataset: JSON / JSONL records through fsspec (memory://, zip://, local files), images,
multi-image, multi-turn, video frames, text only; lazy JSONL offsets; every bad-data case and skip counting."""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from components.datasets.llava import LlavaDataset, to_tensor, uniform_indices
from toolkit import registry
from toolkit.errors import ChimeraError

S = 16  # image_size
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
N_FRAMES = 12  # frames on disk; max_frames=8 samples uniform_indices(12, 8)


def png(color: tuple[int, int, int], size: tuple[int, int] = (24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def gray(i: int) -> tuple[int, int, int]:
    """Frame ``i`` (1-based) is a flat grey whose level encodes its number."""
    return (i * 20, i * 20, i * 20)


def human(value: str) -> dict[str, str]:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict[str, str]:
    return {"from": "gpt", "value": value}


def files() -> dict[str, bytes]:
    """Image files of the test dataset, relative to the annotation file's folder."""
    out = {
        "images/red.png": png(RED),
        "images/green.png": png(GREEN),
        "images/blue.png": png(BLUE),
        "images/wide.png": png(WHITE, (40, 20)),  # not square: resized to S x S
        "images/corrupt.png": b"\x89PNG\r\n\x1a\n but not really a png",
        "videos/empty/readme.txt": b"no frames here",
        "videos/movie.mp4": b"\x00\x00\x00\x18ftypmp42",
    }
    # frame_1 .. frame_12: a natural sort must put frame_2 before frame_10
    out.update({f"videos/clip/frame_{i}.png": png(gray(i)) for i in range(1, N_FRAMES + 1)})
    out["videos/clip/notes.txt"] = b"not a frame"
    return out


RECORDS: list[dict[str, Any]] = [
    {"id": "single", "image": "images/red.png", "conversations": [human("<image>\nWhat color?"), gpt("red")]},
    {
        "id": "multi",
        "image": ["images/green.png", "images/blue.png"],
        "conversations": [human("<image> <image>\nWhich one is blue?"), gpt("the second")],
    },
    {
        "id": "multiturn",
        "image": "images/wide.png",
        "conversations": [
            human("What is this?\n<image>"),
            gpt("A white rectangle."),
            human("Is it wide?"),
            gpt("Yes."),
        ],
    },
    {
        "id": "video",
        "video": "videos/clip",
        "conversations": [human("<video>\nWhat happens?"), gpt("It fades.")],
    },
    {
        # LLaVA-NeXT-Video convention: one <image> stands for the whole video; frames given as a list
        "id": "video_list",
        "video": ["videos/clip/frame_1.png", "videos/clip/frame_2.png", "videos/clip/frame_3.png"],
        "conversations": [human("<image>\nDescribe."), gpt("Grey.")],
    },
    {
        "id": "video_and_image",
        "image": "images/red.png",
        "video": "videos/clip",
        "conversations": [human("<video> then <image>\nSame colour?"), gpt("No.")],
    },
    {
        "id": 7,
        "conversations": [human("Hello, who are you?"), gpt("A language model."), human("Ok."), gpt("Ok.")],
    },
]


def dump(records: list[Any], fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps(records, indent=2).encode()
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_memory(content: dict[str, bytes]) -> str:
    """Write ``content`` under a fresh memory:// folder; return the folder URL."""
    root = f"memory://llava-{uuid.uuid4().hex}"
    for rel, data in content.items():
        with fsspec.open(f"{root}/{rel}", "wb") as f:
            f.write(data)
    return root


def write_zip(content: dict[str, bytes], tmp_path: Path) -> tuple[str, str]:
    """Write ``content`` under ``data/`` of a zip archive; return (archive path, folder URL prefix)."""
    archive = tmp_path / f"llava-{uuid.uuid4().hex[:8]}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for rel, data in content.items():
            z.writestr(f"data/{rel}", data)
    return str(archive), "data"


def write_local(content: dict[str, bytes], tmp_path: Path) -> str:
    root = tmp_path / f"llava-{uuid.uuid4().hex[:8]}"
    for rel, data in content.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return str(root)


Store = Callable[[dict[str, bytes], str], str]


@pytest.fixture(params=["memory", "zip", "local"])
def store(request, tmp_path) -> Store:
    """``store(files, annotation_name) -> annotation URL`` on memory://, inside a zip archive, or on disk."""

    def write(content: dict[str, bytes], name: str) -> str:
        if request.param == "memory":
            return f"{write_memory(content)}/{name}"
        if request.param == "zip":
            archive, folder = write_zip(content, tmp_path)
            return f"zip://{folder}/{name}::{archive}"
        return f"{write_local(content, tmp_path)}/{name}"

    return write


def dataset(records: list[Any], fmt: str = "jsonl", root: str | None = None, **kwargs: Any) -> LlavaDataset:
    """A memory:// dataset of ``records`` (plus the image files)."""
    name = f"train.{fmt}"
    url = f"{root or write_memory(files())}/{name}"
    with fsspec.open(url, "wb") as f:
        f.write(dump(records, fmt))
    return LlavaDataset(url, **kwargs)


def _identity(sample: Any) -> Any:  # module-level collate functions pickle under any start method
    return sample


def _sum_skipped(samples: list[dict[str, Any]]) -> int:
    return sum(s["skipped"] for s in samples)


def flat(color: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.float32)[:, None, None].expand(3, S, S) / 255


def px(images: list[Any]) -> torch.Tensor:
    """The dataset's Pillow images (native sizes) squashed to S x S as a ``[n, 3, S, S]`` batch."""
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
    return torch.stack([to_tensor(im, S) for im in images])


# -- reading -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_reads_every_record(store, fmt):
    url = store({**files(), f"train.{fmt}": dump(RECORDS, fmt)}, f"train.{fmt}")
    ds = LlavaDataset(url, max_frames=8)
    assert len(ds) == len(RECORDS)
    # a JSON list, or JSONL inside a (compressed) archive, is held in memory; other JSONL stays on disk
    assert (ds._index.blob is not None) == (fmt == "json" or url.startswith("zip://"))
    by_id = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    assert list(by_id) == ["single", "multi", "multiturn", "video", "video_list", "video_and_image", "7"]

    single = by_id["single"]
    assert px(single["images"]).shape == (1, 3, S, S) and len(single["images"]) == 1
    torch.testing.assert_close(px(single["images"])[0], flat(RED))
    assert single["conversations"] == RECORDS[0]["conversations"]
    assert single["skipped"] == 0

    multi = by_id["multi"]
    assert px(multi["images"]).shape == (2, 3, S, S)
    torch.testing.assert_close(px(multi["images"])[0], flat(GREEN))  # placeholder order
    torch.testing.assert_close(px(multi["images"])[1], flat(BLUE))

    multiturn = by_id["multiturn"]
    assert multiturn["images"][0].size == (40, 20)  # native size: the collator preprocesses
    torch.testing.assert_close(px(multiturn["images"])[0], flat(WHITE))
    assert [t["from"] for t in multiturn["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert multiturn["conversations"][2]["value"] == "Is it wide?"

    picked = [i + 1 for i in uniform_indices(N_FRAMES, 8)]  # frame numbers, natural order
    assert picked[0] == 1 and picked[-1] == N_FRAMES and len(picked) == 8
    video = by_id["video"]
    assert px(video["images"]).shape == (8, 3, S, S)
    for frame, k in zip(px(video["images"]), picked):
        torch.testing.assert_close(frame, flat(gray(k)))
    assert video["conversations"][0]["value"] == " ".join(["<image>"] * 8) + "\nWhat happens?"

    video_list = by_id["video_list"]  # 3 frames <= max_frames: all kept, the single <image> expanded
    assert px(video_list["images"]).shape == (3, 3, S, S)
    for frame, k in zip(px(video_list["images"]), (1, 2, 3)):
        torch.testing.assert_close(frame, flat(gray(k)))
    assert video_list["conversations"][0]["value"] == "<image> <image> <image>\nDescribe."

    both = by_id["video_and_image"]  # frames first (the <video> comes first), then the image
    assert px(both["images"]).shape == (9, 3, S, S)
    torch.testing.assert_close(px(both["images"])[-1], flat(RED))
    torch.testing.assert_close(px(both["images"])[0], flat(gray(1)))
    assert both["conversations"][0]["value"].count("<image>") == 9

    text = by_id["7"]  # integer ids become strings
    assert text["images"] is None
    assert text["conversations"] == RECORDS[6]["conversations"]


def test_image_root_and_absolute_urls(tmp_path):
    images = write_memory(files())
    records = [
        {"id": "rel", "image": "images/blue.png", "conversations": [human("<image>"), gpt("blue")]},
        {"id": "abs", "image": f"{images}/images/red.png", "conversations": [human("<image>"), gpt("red")]},
    ]
    annotations = tmp_path / "ann.jsonl"  # annotations on disk, images on memory://
    annotations.write_bytes(dump(records, "jsonl"))
    ds = LlavaDataset(f"file://{annotations}", image_root=images)
    torch.testing.assert_close(px(ds[0]["images"])[0], flat(BLUE))
    torch.testing.assert_close(px(ds[1]["images"])[0], flat(RED))


def test_max_frames_and_limit():
    ds = dataset(RECORDS, max_frames=3, limit=4)
    assert len(ds) == 4
    video = ds[3]
    assert px(video["images"]).shape == (3, 3, S, S)
    for frame, k in zip(px(video["images"]), (1, 7, 12)):  # linspace(0, 11, 3) rounded: 0, 6, 11
        torch.testing.assert_close(frame, flat(gray(k)))
    assert ds[-1]["id"] == "video"
    with pytest.raises(IndexError):
        ds[4]


def test_to_tensor_is_bicubic_resize_to_floats_in_unit_range():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    out = to_tensor(image, 20)
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    expected = np.asarray(image.resize((20, 20), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    torch.testing.assert_close(out, torch.from_numpy(expected).permute(2, 0, 1))
    gray_l = to_tensor(Image.new("L", (8, 8), 51), 8)  # other modes become RGB
    torch.testing.assert_close(gray_l, torch.full((3, 8, 8), 0.2))


def test_built_through_the_registry_and_collated():
    root = write_memory(files())
    with fsspec.open(f"{root}/train.jsonl", "wb") as f:
        f.write(dump(RECORDS, "jsonl"))
    ds = registry.build(
        "dataset", {"name": "llava", "annotations": f"{root}/train.jsonl"}, "data.train", image_size=S
    )
    assert isinstance(ds, LlavaDataset)  # image_size is derived for datasets that take it; llava does not
    with pytest.raises(ChimeraError, match="on_bad_sample"):
        node = {"name": "llava", "annotations": "x.jsonl", "on_bad_sample": "ignore"}
        registry.validate("dataset", node, "data.train", derived=("image_size",))

    # the collator's encode sees one <image> per frame: slots match the images
    from toolkit.data.collate import encode
    from toolkit.data.tokenizer import build_word_tokenizer

    samples = [ds[i] for i in range(len(ds))]
    words = [t["value"] for s in samples for t in s["conversations"]]
    tok = build_word_tokenizer([w.replace("<image>", " ") for w in words])
    for s in samples:
        n = 0 if s["images"] is None else len(s["images"])
        out = encode(s, tok, image_tokens=[2] * n, max_length=4096)
        assert out["n_images"] == n


def test_pickles_and_reads_in_dataloader_workers(tmp_path):
    root = write_local(files(), tmp_path)
    (Path(root) / "train.jsonl").write_bytes(dump(RECORDS, "jsonl"))
    ds = LlavaDataset(f"{root}/train.jsonl")
    assert ds[0]["id"] == "single"  # opens the annotation file in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles is None and clone[1]["id"] == "multi"
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_identity)
    assert [s["id"] for s in loader] == [
        r["id"] if isinstance(r["id"], str) else str(r["id"]) for r in RECORDS
    ]


# -- laziness ------------------------------------------------------------------------------------------------


def test_jsonl_keeps_offsets_not_records(tmp_path):
    n = 200_000
    path = tmp_path / "big.jsonl"
    line = '{"id": "r%d", "conversations": [{"from": "human", "value": "q %d"}, {"from": "gpt", "value": "a"}]}\n'
    with open(path, "w") as f:
        f.writelines(line % (i, i) for i in range(n))
    ds = LlavaDataset(str(path))
    assert len(ds) == n
    index = ds._index
    assert (
        isinstance(index.starts, np.ndarray) and index.starts.dtype == np.int64 and index.starts.shape == (n,)
    )
    assert index.blob is None and index.lines is None  # nothing held but the offsets
    big = [k for k, v in vars(ds).items() if isinstance(v, (list, dict, tuple, bytes)) and len(v) > 1000]
    assert big == []
    assert ds[0]["id"] == "r0" and ds[123_456]["id"] == "r123456" and ds[n - 1]["id"] == f"r{n - 1}"
    assert ds[123_456]["conversations"][0]["value"] == "q 123456"


def test_blank_lines_are_dropped_and_line_numbers_kept():
    good = {"id": "g", "conversations": [human("hi"), gpt("ho")]}
    text = "\n" + json.dumps(good) + "\n\r\n\n" + json.dumps({"id": "bad", "conversations": []}) + "\n\n"
    root = write_memory({})
    with fsspec.open(f"{root}/a.jsonl", "wb") as f:
        f.write(text.encode())
    ds = LlavaDataset(f"{root}/a.jsonl")
    assert len(ds) == 2 and ds[0]["id"] == "g"
    with pytest.raises(ChimeraError, match=r"a\.jsonl' line 5 \(id 'bad'\): 'conversations' is empty"):
        ds[1]


def test_json_list_is_held_as_one_buffer():
    ds = dataset(RECORDS, fmt="json")
    assert ds._index.kind == "json" and isinstance(ds._index.blob, bytes)
    assert ds._index.starts.dtype == np.int64 and len(ds) == len(RECORDS)
    assert ds[6]["id"] == "7"
    # pretty-printed, non-ASCII records (byte offsets differ from character offsets), with a limit
    records = [
        {"id": f"ü{i}", "conversations": [human("Qu'est-ce que c'est ? 图像"), gpt(f"ça {i}")]}
        for i in range(5)
    ]
    root = write_memory({})
    with fsspec.open(f"{root}/a.json", "wb") as f:
        f.write(json.dumps(records, indent=1, ensure_ascii=False).encode())
    ds = LlavaDataset(f"{root}/a.json", limit=3)
    assert len(ds) == 3
    assert [ds[i]["id"] for i in range(3)] == ["ü0", "ü1", "ü2"]
    assert ds[2]["conversations"] == records[2]["conversations"]


# -- bad data ------------------------------------------------------------------------------------------------

OK = [human("<image>\nq"), gpt("a")]
BAD_CASES = [
    (
        "missing image",
        {"image": "images/nope.png", "conversations": OK},
        r"image 'images/nope\.png' not found",
    ),
    (
        "corrupt image",
        {"image": "images/corrupt.png", "conversations": OK},
        r"cannot decode image 'images/corrupt",
    ),
    ("no conversations", {"image": "images/red.png"}, r"'conversations' must be a list of turns, got no"),
    (
        "conversations not a list",
        {"conversations": "hi"},
        r"'conversations' must be a list of turns, got str",
    ),
    ("empty conversation", {"conversations": []}, r"'conversations' is empty"),
    ("turn not a mapping", {"conversations": ["hi", gpt("a")]}, r"turn 0: expected an object"),
    ("value not a string", {"conversations": [human(3), gpt("a")]}, r"turn 0: 'value' must be a string"),
    (
        "unknown speaker",
        {"conversations": [{"from": "system", "value": "x"}, gpt("a")]},
        r"'from' is 'system'",
    ),
    (
        "gpt first",
        {"conversations": [gpt("a"), human("q")]},
        r"turn 0 is from 'gpt' but 'human' was expected",
    ),
    ("two human turns", {"conversations": [human("q"), human("q"), gpt("a")]}, r"turn 1 is from 'human'"),
    ("ends with human", {"conversations": [human("q"), gpt("a"), human("q")]}, r"ends with a 'human' turn"),
    (
        "image in gpt turn",
        {"conversations": [human("q"), gpt("<image>")]},
        r"turn 1: a placeholder in a 'gpt'",
    ),
    ("image not a path", {"image": 5, "conversations": OK}, r"'image' must be a path or a list of paths"),
    ("id of wrong type", {"id": ["x"], "conversations": OK}, r"'id' must be a string or an integer"),
    (
        "more placeholders than images",
        {"image": "images/red.png", "conversations": [human("<image><image>"), gpt("a")]},
        r"2 '<image>' placeholder\(s\) in the conversation but 1 image\(s\)",
    ),
    (
        "image without placeholder",
        {"image": "images/red.png", "conversations": [human("q"), gpt("a")]},
        r"0 '<image>'",
    ),
    (
        "placeholder without image",
        {"conversations": OK},
        r"1 '<image>' placeholder\(s\) in the conversation but 0",
    ),
    (
        "video placeholder, no video",
        {"conversations": [human("<video>"), gpt("a")]},
        r"but the record has no 'video'",
    ),
    (
        "video without placeholder",
        {"video": "videos/clip", "conversations": [human("q"), gpt("a")]},
        r"has a 'video' but 0 '<video>' placeholders",
    ),
    (
        "video folder missing",
        {"video": "videos/nope", "conversations": OK},
        r"video folder 'videos/nope' not found",
    ),
    (
        "video file undecodable (or no PyAV)",
        {"video": "videos/movie.mp4", "conversations": OK},
        r"(video 'videos/movie\.mp4' is a file; decoding video files needs PyAV|cannot decode video 'videos/movie\.mp4')",
    ),
    ("video without frames", {"video": "videos/empty", "conversations": OK}, r"holds no frame images"),
    (
        "missing frame",
        {"video": ["videos/clip/frame_99.png"], "conversations": OK},
        r"frame 'videos/clip/frame_99",
    ),
]


@pytest.mark.parametrize("case, record, message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_names_file_line_and_id(case, record, message):
    good = {"id": "good", "conversations": [human("hi"), gpt("ho")]}
    record = {"id": "bad-one", **record} if "id" not in record else record
    ds = dataset([good, good, record])
    with pytest.raises(ChimeraError, match=message) as err:
        ds[2]
    text = str(err.value)
    assert "train.jsonl' line 3" in text
    if isinstance(record["id"], str):
        assert "(id 'bad-one')" in text


def test_unparseable_lines():
    root = write_memory({})
    lines = [
        json.dumps({"id": "g", "conversations": [human("hi"), gpt("ho")]}),
        "[1, 2]",
        '{"id": "x", oops}',
    ]
    with fsspec.open(f"{root}/a.jsonl", "wb") as f:
        f.write("\n".join(lines).encode())
    ds = LlavaDataset(f"{root}/a.jsonl")
    with pytest.raises(
        ChimeraError, match=r"a\.jsonl' line 2: expected a JSON object \(a record\), got list"
    ):
        ds[1]
    with pytest.raises(ChimeraError, match=r"a\.jsonl' line 3: not valid JSON"):
        ds[2]


def test_json_list_errors_name_the_item():
    good = {"id": "good", "conversations": [human("hi"), gpt("ho")]}
    bad = {"id": "b", "image": "images/nope.png", "conversations": OK}
    ds = dataset([good, bad], fmt="json")
    with pytest.raises(
        ChimeraError, match=r"train\.json' item 1 \(id 'b'\): image 'images/nope\.png' not found"
    ):
        ds[1]
    with pytest.raises(ChimeraError, match=r"train\.json' item 1: expected a JSON object"):
        dataset([good, "nonsense"], fmt="json")  # checked at open
    with pytest.raises(ChimeraError, match=r"item 0 \(id 'n'\): 'conversations' must be a list"):
        dataset([{"id": "n"}], fmt="json")
    assert len(dataset([good, "nonsense"], fmt="json", on_bad_sample="skip")) == 2  # left to __getitem__


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"  \n\n", "the file is empty"),
        (b"id,image\n1,a.png\n", "expected a JSON list of records or JSON Lines"),
        (b'{"a": 1}', None),  # one record: fine at open
        (b"[]", "no records"),
        (b'{"records": []}\n', None),
        (b'[{"conversations": []}, {"a":', r"not valid JSON: Expecting value at line 1 column 30"),
        (b'[{"conversations": []}\n\n', r"not valid JSON: expected ',' or '\]' after item 0 at line 3"),
        (b'[{"conversations": []}] [', "not valid JSON: extra data after the list"),
        (b'[{"conversations": []}, 2]', "item 1: expected a JSON object"),
    ],
)
def test_annotation_file_errors(content, message):
    root = write_memory({})
    with fsspec.open(f"{root}/a.json", "wb") as f:
        f.write(content)
    if message is None:
        assert len(LlavaDataset(f"{root}/a.json")) == 1
    else:
        with pytest.raises(ChimeraError, match=message):
            LlavaDataset(f"{root}/a.json")


def _missing_backend() -> tuple[str, str]:
    """A remote protocol whose fsspec backend is not installed here, and that backend's package."""
    for protocol, package in (("s3", "s3fs"), ("gs", "gcsfs"), ("abfs", "adlfs"), ("oci", "ocifs")):
        if importlib.util.find_spec(package) is None:
            return protocol, package
    pytest.skip("every remote fsspec backend tried is installed")


def test_missing_annotations_and_backend():
    with pytest.raises(ChimeraError, match="file not found"):
        LlavaDataset(f"memory://nothing-{uuid.uuid4().hex}/a.jsonl")
    with pytest.raises(ChimeraError, match="Protocol not known"):
        LlavaDataset("nosuchproto://bucket/a.jsonl")
    protocol, package = _missing_backend()
    with pytest.raises(ChimeraError, match=rf"install {package} \(pip install {package}\)"):
        LlavaDataset(f"{protocol}://bucket/llava/train.jsonl")


def test_s3_through_a_local_moto_server(monkeypatch):
    """Annotations and images on S3 (moto's in-process server; needs moto[server] and s3fs, else skipped)."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("llava-bucket")
        for rel, data in {**files(), "data/train.jsonl": dump(RECORDS, "jsonl")}.items():
            fs.pipe(f"llava-bucket/{rel if rel.startswith('data/') else 'data/' + rel}", data)
        ds = LlavaDataset("s3://llava-bucket/data/train.jsonl", storage_options=options)
        assert len(ds) == len(RECORDS) and ds._index.blob is None
        torch.testing.assert_close(px(ds[0]["images"])[0], flat(RED))
        assert px(ds[3]["images"]).shape == (8, 3, S, S)  # a frame folder listed on S3
        assert ds[6]["images"] is None
    finally:
        server.stop()


# -- skipping --------------------------------------------------------------------------------------------------


def test_skip_returns_the_next_good_record_and_counts():
    good = [{"id": f"g{i}", "image": "images/red.png", "conversations": OK} for i in range(3)]
    bad_image = {"id": "b1", "image": "images/nope.png", "conversations": OK}
    bad_turns = {"id": "b2", "conversations": [human("q")]}
    records = [good[0], bad_image, bad_turns, good[1], bad_image, good[2]]
    ds = dataset(records, on_bad_sample="skip")
    assert ds.skipped == 0
    first = ds[1]
    assert first["id"] == "g1" and first["skipped"] == 1  # b1 (and b2) passed over
    assert ds.skipped == 1 and len(ds.skip_reasons) == 1
    assert "line 2 (id 'b1')" in ds.skip_reasons[0] and "not found" in ds.skip_reasons[0]
    again = ds[1]  # deterministic
    assert again["id"] == "g1" and torch.equal(px(again["images"]), px(first["images"])) and ds.skipped == 2
    assert ds[2]["id"] == "g1" and ds.skipped == 3
    assert "line 3 (id 'b2')" in ds.skip_reasons[-1] and "ends with a 'human' turn" in ds.skip_reasons[-1]
    assert ds[0]["skipped"] == 0 and ds[3]["skipped"] == 0 and ds.skipped == 3
    assert ds[4]["id"] == "g2" and ds.skipped == 4
    wrap = dataset([good[0], bad_image], on_bad_sample="skip")
    assert wrap[1]["id"] == "g0" and wrap[1]["skipped"] == 1  # wraps around to the start
    # summed over an epoch, the per-sample marker counts the bad records the sampler asked for
    fresh = dataset(records, on_bad_sample="skip")
    assert sum(fresh[i]["skipped"] for i in range(len(fresh))) == 3 == fresh.skipped


def test_skip_gives_up_after_max_tries():
    bad = {"id": "b", "image": "images/nope.png", "conversations": OK}
    good = {"id": "g", "conversations": [human("q"), gpt("a")]}
    ds = dataset([bad] * 5 + [good], on_bad_sample="skip", max_tries=3)
    with pytest.raises(
        ChimeraError, match=r"3 consecutive bad records from index 0 .*max_tries=3.*not found"
    ):
        ds[0]
    assert ds.skipped == 1
    assert ds[3]["id"] == "g" and ds[3]["skipped"] == 1
    many = dataset([bad] * 20 + [good], on_bad_sample="skip")
    assert all(many[i]["id"] == "g" for i in range(20))
    assert many.skipped == 20 and len(many.skip_reasons) == 8 and "line 20 (id 'b')" in many.skip_reasons[-1]


def test_skip_counts_per_worker(tmp_path):
    """Workers hold copies: the parent's counter stays 0, the per-sample markers carry the count."""
    bad = {"id": "b", "image": "images/nope.png", "conversations": OK}
    good = {"id": "g", "conversations": [human("q"), gpt("a")]}
    root = write_local({"train.jsonl": dump([good, bad, bad, good], "jsonl")}, tmp_path)
    ds = LlavaDataset(f"{root}/train.jsonl", on_bad_sample="skip")
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=_sum_skipped)
    assert sum(loader) == 2 and ds.skipped == 0


def test_missing_backend_is_not_skipped():
    protocol, package = _missing_backend()
    ds = dataset(
        [{"id": "r", "image": f"{protocol}://bucket/x.png", "conversations": OK}], on_bad_sample="skip"
    )
    with pytest.raises(ChimeraError, match=f"install {package}"):
        ds[0]
    assert ds.skipped == 0


def test_a_video_file_without_pyav_is_an_error_even_under_skip(monkeypatch):
    """A missing optional dependency is not bad data: it must not be skipped sample after sample."""
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    ds = dataset([{"id": "v", "video": "videos/movie.mp4", "conversations": OK}], on_bad_sample="skip")
    with pytest.raises(ChimeraError, match=r"needs PyAV: pip install 'chimera-toolkit\[video\]'"):
        ds[0]
    assert ds.skipped == 0
