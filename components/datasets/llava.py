"""``llava``: LLaVA-format conversation data (LLaVA-1.5's 665K mix, ShareGPT4V, Mantis, video instructions).

One record per sample, in a JSON list or a JSON Lines file (detected from the first non-blank byte)::

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",        # or a list (multi-image), or absent (text only)
     "video": "videos/v_123",                           # optional: a folder of frames, or a list of frame paths
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "White and red."}, ...]}   # multi-turn: human, gpt, ...

Paths: the annotations, every image and every frame are opened through fsspec, so a plain path, ``file://``,
``memory://``, a chained archive URL (``zip://train.jsonl::/data/llava.zip``) and, with their backend
installed, ``s3://`` (s3fs) or ``gs://`` (gcsfs) all work; ``storage_options`` go to ``fsspec.core.url_to_fs``
(for a chained URL, key them by protocol: ``{"s3": {"anon": true}}``). A relative image path resolves
against ``image_root`` (default: the annotation file's folder, inside the archive for a ``zip://`` URL); a
path with a protocol (``s3://b/x.jpg``) is opened as it is.

Lazy loading: opening a JSON Lines file scans it once for line starts and keeps only those byte offsets (an
int64 numpy array, 8 bytes per record; blank lines are dropped, and line numbers are kept only when blank
lines shift them); ``__getitem__`` seeks, reads one line and parses it (about 25 us per record). Measured on
the 2-core development machine (shared, load average 2-4, page cache warm): opening a 1,000,000-line JSONL of
LLaVA-like records (573 MB) takes 0.4-0.9 s, timed around
``LlavaDataset("/tmp/llava_1m.jsonl")`` (``python -c "import time; from
components.datasets.llava import LlavaDataset; t = time.perf_counter(); LlavaDataset('/tmp/llava_1m.jsonl');
print(time.perf_counter() - t)"``). A JSON list has no line boundaries, so it is parsed ONCE
at open, record by record (``json.JSONDecoder.raw_decode``), keeping only each record's text in one bytes
buffer with int64 start/end offsets: no per-record Python objects remain, so forked DataLoader workers do not
copy them page by page through reference counts, and the whole parsed list never exists at once. That costs
what ``json.load`` costs (about 4 s for 200,000 records / 114 MB here). A JSON Lines file inside an archive
(``zip://``) is read into memory, then indexed the same way, because seeking inside a compressed member
decompresses it again from the start.

Images are decoded with Pillow, converted to RGB and returned at their own size: the collator's vision path
(``toolkit/data/vision.py``, in the loader's workers) applies the encoder's own preprocessing (its timm data
config, ``data.preprocess``) or cuts AnyRes tiles, the same function for every dataset.

Video: a record's ``video`` is a folder of frame images (sorted by name, numbers compared as numbers), a
list of frame paths, or a video file (``.mp4``, ``.webm``...; decoded with PyAV, the optional extra
``pip install 'chimera-toolkit[video]'``, imported only when a video file is met); ``max_frames`` frames are sampled uniformly (``np.linspace(0, n - 1, max_frames)``
rounded, first and last frames kept; LLaVA-NeXT-Video samples with the same linspace). Frames become images: the human turn's
one ``<video>`` placeholder (Video-LLaVA's convention) is expanded into one ``<image>`` per sampled frame,
separated by spaces, so the collator, which only knows ``<image>``, reserves slots per frame; a video record
with no ``image`` and no ``<video>`` but exactly one ``<image>`` (LLaVA-NeXT-Video / LLaVA-Video-178K's
convention) has that ``<image>`` expanded instead. The frames sit in ``images`` at the placeholder's position
among the record's images. LongLLaVA's ``<vid>`` frames ``<t>`` ``</vid>`` markup is the template's job (a
dataset may not type markup); the sample's ``frames`` says which images are the frames of each video.

Bad data (a missing or undecodable image, a record that is not an object, no or ill-typed conversations, a
placeholder count that does not match the images, an empty or non-alternating conversation, invalid JSON)
raises a ``ChimeraError`` naming the annotation file, the line (JSONL) or item (JSON list), and the record id.
With ``on_bad_sample: skip`` the sample at ``index`` is replaced by the next good one (``index + 1``,
``index + 2``, ... modulo the length, at most ``max_tries`` records, so the result is deterministic) and the
replacement is counted: ``self.skipped`` is the number of requested records that were bad and replaced, in
this process, and ``self.skip_reasons`` keeps the last few reasons (the requested record's error). DataLoader
workers hold their own copies of the dataset, so those counters are per process (the main process's copy
stays at 0); every sample therefore also carries ``"skipped"``: 1 when it replaces a bad record, else 0.
Summed over batches (a collator can sum it per batch, as it sums ``n_truncated``, and the trainer add the
batch sums over steps and ranks) it gives ``data/skipped``, the number of bad samples the loaders met.
"""

from __future__ import annotations

import collections
import json
import os
import posixpath
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from toolkit.data.markup import IMAGE
from toolkit.data.vision import uniform_indices  # noqa: F401  (frame sampling, shared with the budget)
from toolkit.errors import ChimeraError
from toolkit.registry import register

if TYPE_CHECKING:  # Pillow is imported when the first image is decoded
    from PIL import Image as PILImage

VIDEO = "<video>"  # placeholder for a record's video; expanded into one <image> per sampled frame
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
HUMAN, GPT = "human", "gpt"

_CHUNK = 1 << 24  # bytes read per step while scanning a JSON Lines file
_BOM = b"\xef\xbb\xbf"
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's insignificant whitespace
_PLACEHOLDER = re.compile(f"({re.escape(IMAGE)}|{re.escape(VIDEO)})")
_REASONS_KEPT = 8


def to_tensor(image: PILImage.Image, image_size: int) -> torch.Tensor:
    """A Pillow image -> FloatTensor[3, image_size, image_size] in [0, 1] (RGB, bicubic resize, aspect ratio
    not kept). Training data goes through ``toolkit.data.vision`` instead (the encoder's own preprocessing);
    this stays for callers that want a plain square resize."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [S, S, 3]
    return pixels.permute(2, 0, 1).contiguous().float().div_(255.0)  # [3, S, S]


class BadRecord(ChimeraError):
    """A record that cannot become a sample (skipped under ``on_bad_sample: skip``, raised otherwise)."""


def _has_protocol(path: str) -> bool:
    return "://" in path or "::" in path


def url_to_fs(url: str, storage_options: dict[str, Any] | None, what: str) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs`` with a one-line error naming the package a missing backend needs."""
    import fsspec
    from fsspec.registry import known_implementations

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        protocol = url.split("::")[0].split("://")[0] if "://" in url else "?"
        known = known_implementations.get(protocol, {})
        package = known.get("class", "").split(".")[0] or "the fsspec backend for this protocol"
        raise ChimeraError(
            f"{what} '{url}': {exc}; install {package} (pip install {package}) to read {protocol}:// paths"
        ) from exc
    except ValueError as exc:
        raise ChimeraError(f"{what} '{url}': {exc}") from exc


def _natural_key(path: str) -> list[Any]:
    """Sort key comparing digit runs as numbers: frame_2 < frame_10."""
    name = posixpath.basename(path.rstrip("/"))
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass
class _Index:
    """Where each record's bytes are: ``starts`` (int64 offsets), 1-based ``lines`` when they are not
    ``index + 1`` (JSONL with blank lines), and ``blob`` when the records live in memory (JSON list,
    JSONL inside an archive) instead of the file; a JSONL record ends at its newline, a JSON list's at
    ``ends``."""

    kind: Literal["jsonl", "json"]
    starts: np.ndarray
    lines: np.ndarray | None = None
    blob: bytes | None = None
    ends: np.ndarray | None = None  # end offsets in ``blob`` (JSON list records may span lines)

    def __len__(self) -> int:
        return len(self.starts)

    def location(self, k: int) -> str:
        if self.kind == "json":
            return f"item {k}"
        return f"line {int(self.lines[k]) if self.lines is not None else k + 1}"

    def truncate(self, limit: int) -> None:
        self.starts = self.starts[:limit]
        if self.ends is not None:
            self.ends = self.ends[:limit]
        if self.lines is not None:
            self.lines = self.lines[:limit]


def _scan_jsonl(f: Any, first: bytes, keep: bool) -> _Index:
    """Offsets of the non-blank lines of a JSON Lines file (read once, in chunks; nothing is parsed)."""
    newlines, chunks, pos = [], [], 0
    chunk = first
    while chunk:
        if keep:
            chunks.append(chunk)
        newlines.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 0x0A) + pos)
        pos += len(chunk)
        chunk = f.read(_CHUNK)
    blob = b"".join(chunks) if keep else None
    ends = np.concatenate([*newlines, np.array([pos], dtype=np.int64)]).astype(np.int64)  # [lines]
    starts = np.concatenate([np.zeros(1, dtype=np.int64), ends[:-1] + 1])  # [lines]
    lengths = ends - starts
    kept = lengths > 0
    for i in np.flatnonzero(lengths == 1):  # a lone '\r' (a blank CRLF line) is blank too
        if blob is not None:
            byte = blob[starts[i] : starts[i] + 1]
        else:
            f.seek(int(starts[i]))
            byte = f.read(1)
        kept[i] = not byte.isspace()
    lines = (np.flatnonzero(kept) + 1).astype(np.int64)  # 1-based line numbers of the records
    if len(lines) == 0 or lines[-1] == len(lines):  # no blank line before the last record: k + 1
        lines = None
    return _Index("jsonl", starts[kept], lines, blob)


@dataclass
class _Handles:
    """Per-process file system objects and the open annotation file (never pickled, reopened after fork)."""

    pid: int
    fs: Any
    path: str
    root_fs: Any
    root: str
    file: Any
    lock: threading.Lock


@register("dataset", "llava")
class LlavaDataset(Dataset):
    """LLaVA-format conversations (JSON list or JSON Lines) with images, multi-image, video frames, text only.

    Args:
        annotations: path or fsspec URL of the JSON / JSONL annotation file.
        image_root: folder (path or URL) relative image and frame paths resolve against; default: the
            annotation file's folder.
        max_frames: frames sampled uniformly from a video (the frame budget; ``data.over_budget:
            fewer_frames`` may keep fewer).
        on_bad_sample: ``error`` raises on a bad record; ``skip`` returns the next good record and counts the
            skip (``skipped``, ``skip_reasons``, and ``sample["skipped"]``: 1 for a replacement, else 0).
        storage_options: fsspec options for the annotation and image file systems (credentials, endpoints).
        limit: keep only the first ``limit`` records (quick runs on a large file).
        max_tries: under ``skip``, how many consecutive records may be tried before giving up with an error.

    Returns per sample: ``{"id": str, "images": [RGB Pillow images at their own size] or None,
    "conversations": [{"from": "human"|"gpt", "value": str}, ...], "frames": [[image indices], ...],
    "skipped": int}``.
    """

    def __init__(
        self,
        annotations: str,
        image_root: str | None = None,
        max_frames: int = 8,
        on_bad_sample: Literal["error", "skip"] = "error",
        storage_options: dict[str, Any] | None = None,
        limit: int | None = None,
        max_tries: int = 64,
    ):
        if int(max_frames) < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if limit is not None and int(limit) < 1:
            raise ValueError(f"limit must be >= 1 (or null for all records), got {limit}")
        if int(max_tries) < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        try:
            import PIL  # noqa: F401
        except ImportError as exc:
            raise ChimeraError("dataset 'llava' decodes images with Pillow: pip install pillow") from exc
        self.annotations = str(annotations)
        self.image_root = None if image_root is None else str(image_root)
        self.max_frames = int(max_frames)
        self.on_bad_sample = on_bad_sample
        self.storage_options = dict(storage_options or {})
        self.max_tries = int(max_tries)
        self.skipped = 0  # bad records requested and replaced in THIS process (each worker counts its own)
        self.skip_reasons: collections.deque[str] = collections.deque(maxlen=_REASONS_KEPT)
        self._handles: _Handles | None = None
        self._index = self._open_index()
        if limit is not None:
            self._index.truncate(int(limit))

    # -- opening -------------------------------------------------------------------------------------------

    def _open_index(self) -> _Index:
        fs, path = url_to_fs(self.annotations, self.storage_options, "llava annotations")
        from fsspec.archive import AbstractArchiveFileSystem

        try:
            f = fs.open(path, "rb")
        except FileNotFoundError as exc:
            raise ChimeraError(f"llava annotations '{self.annotations}': file not found") from exc
        except (IsADirectoryError, PermissionError) as exc:
            raise ChimeraError(f"llava annotations '{self.annotations}': cannot open: {exc}") from exc
        with f:
            first = f.read(_CHUNK)
            head = first[len(_BOM) :] if first.startswith(_BOM) else first
            stripped = head.lstrip()
            if not stripped:
                raise ChimeraError(f"llava annotations '{self.annotations}': the file is empty")
            if stripped[:1] == b"[":
                index = self._json_list(first + f.read())
            elif stripped[:1] == b"{":
                index = _scan_jsonl(f, first, keep=isinstance(fs, AbstractArchiveFileSystem))
            else:
                raise ChimeraError(
                    f"llava annotations '{self.annotations}': expected a JSON list of records or JSON Lines "
                    f"(one object per line), but the file starts with {stripped[:20]!r}"
                )
        if len(index) == 0:
            raise ChimeraError(f"llava annotations '{self.annotations}': no records")
        return index

    def _json_list(self, data: bytes) -> _Index:
        """Parse a JSON list once, record by record, keeping each record's text (not its objects)."""
        where = f"llava annotations '{self.annotations}'"
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ChimeraError(f"{where}: not UTF-8 text: {exc}") from exc
        del data
        decoder, spans = json.JSONDecoder(), []
        pos = _WHITESPACE.match(text, text.index("[") + 1).end()
        while not text.startswith("]", pos):
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise ChimeraError(
                    f"{where}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                ) from exc
            if self.on_bad_sample == "error":  # cheap structural checks now; the rest in __getitem__
                self._check_item(record, len(spans), where)
            spans.append((pos, end))
            pos = _WHITESPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WHITESPACE.match(text, pos + 1).end()
            elif not text.startswith("]", pos):
                line = text.count("\n", 0, pos) + 1
                raise ChimeraError(
                    f"{where}: not valid JSON: expected ',' or ']' after item {len(spans) - 1} at line {line}"
                )
        if text[pos + 1 :].strip():
            raise ChimeraError(f"{where}: not valid JSON: extra data after the list")
        bounds = np.array(spans, dtype=np.int64).reshape(-1, 2)  # [n, 2]: character offsets
        if text.isascii():  # characters are bytes: keep the text as it is
            return _Index("json", bounds[:, 0].copy(), blob=text.encode("ascii"), ends=bounds[:, 1].copy())
        pieces = [text[a:b].encode() for a, b in spans]
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        ends = np.cumsum(lengths)
        return _Index("json", ends - lengths, blob=b"".join(pieces), ends=ends)

    def _check_item(self, record: Any, k: int, where: str) -> None:
        if not isinstance(record, dict):
            raise BadRecord(
                f"{where} item {k}: expected a JSON object (a record), got {type(record).__name__}"
            )
        if not isinstance(record.get("conversations"), list):
            raise BadRecord(
                f"{where} item {k} (id '{record.get('id', '?')}'): 'conversations' must be a list of turns"
            )

    def _open(self) -> _Handles:
        """The file systems and annotation file of this process (opened again after a fork)."""
        h = self._handles
        if h is not None and h.pid == os.getpid():
            return h
        fs, path = url_to_fs(self.annotations, self.storage_options, "llava annotations")
        if self.image_root is None:
            root_fs, root = fs, posixpath.dirname(path)
        else:
            root_fs, root = url_to_fs(self.image_root, self.storage_options, "llava image_root")
        file = fs.open(path, "rb") if self._index.blob is None else None
        self._handles = _Handles(os.getpid(), fs, path, root_fs, root, file, threading.Lock())
        return self._handles

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = None  # open files and locks stay in their process
        return state

    # -- access --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"id", "images": [Pillow images] or None, "conversations", "frames", "skipped": int}``."""
        n, index = len(self), int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        if self.on_bad_sample == "error":
            return {**self._load(index), "skipped": 0}
        tries, last = min(n, self.max_tries), ""
        for offset in range(tries):
            try:
                sample = self._load((index + offset) % n)
            except BadRecord as exc:
                last = str(exc)
                if offset == 0:  # count the requested record; the others count when they are requested
                    self.skipped += 1
                    self.skip_reasons.append(last)
                continue
            return {**sample, "skipped": int(offset > 0)}
        raise ChimeraError(
            f"llava annotations '{self.annotations}': {tries} consecutive bad records from index {index} "
            f"(on_bad_sample: skip gives up after max_tries={self.max_tries}); last: {last}"
        )

    def _raw(self, k: int) -> bytes:
        start = int(self._index.starts[k])
        blob = self._index.blob
        if self._index.ends is not None:
            raw = blob[start : int(self._index.ends[k])]
        elif blob is not None:
            end = blob.find(b"\n", start)
            raw = blob[start : end if end >= 0 else len(blob)]
        else:
            h = self._open()
            with h.lock:
                h.file.seek(start)
                raw = h.file.readline()
        return raw[len(_BOM) :] if k == 0 and raw.startswith(_BOM) else raw

    def _load(self, k: int) -> dict[str, Any]:
        where = f"llava annotations '{self.annotations}' {self._index.location(k)}"
        raw = self._raw(k)
        if not raw.strip():
            raise BadRecord(f"{where}: blank line")
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRecord(f"{where}: not valid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise BadRecord(f"{where}: expected a JSON object (a record), got {type(record).__name__}")
        sid = record.get("id")
        if sid is None:
            sid = f"{posixpath.basename(self.annotations)}:{self._index.location(k).split()[-1]}"
        elif isinstance(sid, (str, int)) and not isinstance(sid, bool):
            sid = str(sid)
        else:
            raise BadRecord(f"{where}: 'id' must be a string or an integer, got {type(sid).__name__}")
        where = f"{where} (id '{sid}')"

        turns = self._conversations(record.get("conversations"), where)
        images = self._paths(record, "image", where)
        video = record.get("video")
        n_image = sum(t["value"].count(IMAGE) for t in turns)
        n_video = sum(t["value"].count(VIDEO) for t in turns)
        if video is not None:
            if n_video == 0 and not images and n_image == 1:  # LLaVA-NeXT-Video: one <image> = the video
                for t in turns:
                    t["value"] = t["value"].replace(IMAGE, VIDEO)
                n_image, n_video = 0, 1
            if n_video != 1:
                raise BadRecord(
                    f"{where}: the record has a 'video' but {n_video} '{VIDEO}' placeholders; a human turn "
                    f"needs exactly one '{VIDEO}' (or, with no 'image', one '{IMAGE}' standing for the video)"
                )
        elif n_video:
            raise BadRecord(f"{where}: {n_video} '{VIDEO}' placeholder(s) but the record has no 'video'")
        if n_image != len(images):
            raise BadRecord(
                f"{where}: {n_image} '{IMAGE}' placeholder(s) in the conversation but {len(images)} image(s) in "
                "'image'; each image needs exactly one placeholder in a human turn"
            )

        frames = self._frames(video, where) if video is not None else []
        decoded: list[PILImage.Image] = []
        groups: list[list[int]] = []  # which images are the frames of the video (the template's layout)
        next_image = iter(images)
        for t in turns:
            if t["from"] != HUMAN:
                continue
            parts = _PLACEHOLDER.split(t["value"])
            for j, part in enumerate(parts):
                if part == IMAGE:
                    decoded.append(self._decode(next(next_image), where))
                elif part == VIDEO:
                    start = len(decoded)
                    decoded.extend(self._decode(frame, where, "frame") for frame in frames)
                    groups.append(list(range(start, len(decoded))))
                    parts[j] = " ".join([IMAGE] * len(frames))
            t["value"] = "".join(parts)
        return {
            "id": sid,
            "images": decoded or None,  # RGB Pillow images, each at its own size
            "conversations": turns,
            "frames": groups,  # [[i0, i1, ...]] per video; [] without one
        }

    # -- checks --------------------------------------------------------------------------------------------

    @staticmethod
    def _conversations(conversations: Any, where: str) -> list[dict[str, str]]:
        """Copies of the turns, checked: a non-empty list alternating human, gpt, ..., ending with gpt."""
        if not isinstance(conversations, list):
            got = "no 'conversations'" if conversations is None else type(conversations).__name__
            raise BadRecord(f"{where}: 'conversations' must be a list of turns, got {got}")
        if not conversations:
            raise BadRecord(f"{where}: 'conversations' is empty")
        turns = []
        for i, turn in enumerate(conversations):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise BadRecord(
                    f"{where}: turn {i}: expected an object with 'from' and 'value', got {turn!r:.80}"
                )
            speaker, value = turn["from"], turn["value"]
            if not isinstance(value, str):
                raise BadRecord(f"{where}: turn {i}: 'value' must be a string, got {type(value).__name__}")
            expected = HUMAN if i % 2 == 0 else GPT
            if speaker not in (HUMAN, GPT):
                raise BadRecord(f"{where}: turn {i}: 'from' is {speaker!r}; expected '{HUMAN}' or '{GPT}'")
            if speaker != expected:
                raise BadRecord(
                    f"{where}: turn {i} is from '{speaker}' but '{expected}' was expected; turns must alternate "
                    "human, gpt, human, ..."
                )
            if speaker == GPT and (IMAGE in value or VIDEO in value):
                raise BadRecord(
                    f"{where}: turn {i}: a placeholder in a 'gpt' turn; images belong in human turns"
                )
            turns.append({"from": speaker, "value": value})
        if len(turns) % 2:
            raise BadRecord(
                f"{where}: the conversation ends with a 'human' turn; expected a 'gpt' answer after it"
            )
        return turns

    @staticmethod
    def _paths(record: dict[str, Any], key: str, where: str) -> list[str]:
        """A record's ``image``: absent/null -> [], a string -> [it], a list of non-empty strings."""
        value = record.get(key)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
            raise BadRecord(f"{where}: '{key}' must be a path or a list of paths, got {value!r:.80}")
        return items

    # -- files ---------------------------------------------------------------------------------------------

    def _resolve(self, path: str) -> tuple[Any, str]:
        if _has_protocol(path):
            return url_to_fs(path, self.storage_options, "llava image")
        h = self._open()
        return h.root_fs, posixpath.normpath(posixpath.join(h.root, path) if h.root else path)

    def _frames(self, video: Any, where: str) -> list[Any]:
        """The record's frames sampled uniformly: paths as written (a list), ``_FsPath`` s (a folder) or
        decoded images (a video file)."""
        if isinstance(video, list):
            if not video or not all(isinstance(p, str) and p for p in video):
                raise BadRecord(f"{where}: 'video' must be a folder or a non-empty list of frame paths")
            return [video[i] for i in uniform_indices(len(video), self.max_frames)]
        if not isinstance(video, str) or not video:
            raise BadRecord(
                f"{where}: 'video' must be a folder, a video file or a list of frame paths, got {video!r:.80}"
            )
        fs, path = self._resolve(video)
        try:
            is_dir = fs.isdir(path)
            if not is_dir and fs.exists(path):
                return self._video_file(fs, path, video, where)
            if not is_dir:
                raise BadRecord(f"{where}: video folder '{video}' not found ({_protocol(fs)}: '{path}')")
            listing = fs.ls(path, detail=False)
        except ChimeraError:  # bad data (BadRecord), or PyAV missing: an error even under skip
            raise
        except Exception as exc:
            raise BadRecord(f"{where}: cannot list video folder '{video}': {exc}") from exc
        names = sorted((p for p in listing if p.lower().endswith(FRAME_EXTENSIONS)), key=_natural_key)
        if not names:
            raise BadRecord(
                f"{where}: video folder '{video}' holds no frame images ({', '.join(FRAME_EXTENSIONS)})"
            )
        # listed paths are fs paths: mark them so _decode does not join them to the root again
        picked = [names[i] for i in uniform_indices(len(names), self.max_frames)]
        return [_FsPath(fs, p, f"{video.rstrip('/')}/{posixpath.basename(p)}") for p in picked]

    def _video_file(self, fs: Any, path: str, shown: str, where: str) -> list[PILImage.Image]:
        """``max_frames`` frames sampled uniformly from a video file, decoded with PyAV (imported here: an
        optional extra). The frame count comes from the container when it says it, else from one counting pass."""
        try:
            import av
        except ImportError as exc:
            raise ChimeraError(
                f"{where}: video '{shown}' is a file; decoding video files needs PyAV: pip install "
                "'chimera-toolkit[video]' (pip install av), or give a folder of extracted frames"
            ) from exc
        try:
            with fs.open(path, "rb") as f, av.open(f) as container:
                n = int(container.streams.video[0].frames or 0)
                if n <= 0:  # not in the header: count by decoding once
                    n = sum(1 for _ in container.decode(video=0))
                    container.seek(0)
                wanted = set(uniform_indices(n, self.max_frames))
                frames = [
                    frame.to_image().convert("RGB")
                    for i, frame in enumerate(container.decode(video=0))
                    if i in wanted
                ]
        except ChimeraError:
            raise
        except Exception as exc:  # PyAV raises its own error types for unreadable containers and codecs
            raise BadRecord(f"{where}: cannot decode video '{shown}': {type(exc).__name__}: {exc}") from exc
        if not frames:
            raise BadRecord(f"{where}: video '{shown}' has no decodable frames")
        return frames

    def _decode(
        self, path: str | _FsPath | PILImage.Image, where: str, what: str = "image"
    ) -> PILImage.Image:
        """One image or frame as an RGB Pillow image at its own size (``BadRecord`` when missing or
        undecodable); an already decoded video frame is returned as it is."""
        from PIL import Image

        if isinstance(path, Image.Image):
            return path
        if isinstance(path, _FsPath):
            fs, full, shown = path.fs, path.path, path.shown
        else:
            fs, full = self._resolve(path)
            shown = path
        try:
            with fs.open(full, "rb") as f:
                image = Image.open(f)
                image.load()
        except FileNotFoundError as exc:
            raise BadRecord(f"{where}: {what} '{shown}' not found ({_protocol(fs)}: '{full}')") from exc
        except ChimeraError:
            raise
        except Exception as exc:  # Pillow raises many types for corrupt files (OSError, SyntaxError, ...)
            raise BadRecord(f"{where}: cannot decode {what} '{shown}': {type(exc).__name__}: {exc}") from exc
        return image.convert("RGB")


@dataclass(frozen=True)
class _FsPath:
    """A path already resolved on a file system (a listed frame), with the name shown in errors."""

    fs: Any
    path: str
    shown: str


def _protocol(fs: Any) -> str:
    protocol = getattr(fs, "protocol", "?")
    return protocol[0] if isinstance(protocol, (tuple, list)) else str(protocol)
