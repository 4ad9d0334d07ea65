"""Prompt templates: LLaVA conversations -> token ids plus a mask of the assistant tokens the loss trains on.

A template is a registered component (kind ``template``, in ``components/templates/``) chosen per experiment
with ``data.template`` (default ``{name: vicuna_v1}``). This module holds what every template shares:

- ``conversation_messages``: checks a LLaVA conversation (``[{"from": "human"|"gpt", "value": str}, ...]``)
  and turns it into chat messages ``[{"role": "user"|"assistant", "content": str}, ...]``, with each
  ``<image>`` written by the template's layout and markup typed into the text rejected.
- ``Layout``: how images and videos are written around the ``<image>`` placeholders, chosen per template with
  ``data.template.layout``: ``longllava`` (the default; each image ``<img><image></img>``, a video
  ``<vid><img><image></img><t><img><image></img>...</vid>``), ``llava`` (the bare ``<image>``, as LLaVA-1.5
  writes ``<image>\\n`` + question: the newline is the data's own), or a mapping naming the markers.
- ``ChatTemplate``: the base of templates that write a conversation as text segments ``(text, is_target)``;
  ``encode`` tokenizes the whole prompt once and marks every token that overlaps a target segment, which is
  how transformers computes ``apply_chat_template(..., return_assistant_tokens_mask=True)`` from a chat
  template's ``{% generation %}`` blocks (so a template and its Jinja twin give the same ids and mask).
- ``build_template``: a config node, a name or a built template -> a template object.

The contract a template meets (the collator and the word-level tokenizer read nothing else)::

    name: str                      # its registry name, for error messages
    markup: tuple[str, ...]        # control strings it writes (<|im_start|>, ...): one token each in a
                                   # word-level vocabulary; never allowed inside a turn's text
    words() -> list[str]           # plain words it writes (USER, ASSISTANT, a system prompt)
    encode(conversations, tokenizer, where, frames=None) -> Encoded   # frames: see below
    layout: Layout                 # optional: its image/video markers (checked against the tokenizer)

``Encoded.targets`` holds, per assistant turn, the text its mask covers (the answer and its end-of-turn
token); the collator checks that the marked tokens are exactly the tokens of those texts, so a template that
masks the wrong span fails loudly, naming the sample, instead of training on the wrong tokens.

Image placeholders stay placeholders here: expanding each ``<image>`` into the image's token slots is the
collator's job (``toolkit.data.collate``).

Videos: a sample may carry ``"frames": [[i0, i1, ...], ...]``, each inner list the 0-based indices (into the
sample's images, i.e. its ``<image>`` placeholders in order) of the frames of one video: consecutive,
ascending, in one human turn, separated by nothing but whitespace (as ``llava`` writes a ``<video>``'s
frames: ``<image> <image> ...``). The layout writes each such run as one video (LongLLaVA: ``<vid>`` frames
joined by ``<t>`` ``</vid>``, the whitespace between them dropped); a sample without ``frames`` is written
image by image. This is also where AnyRes tiles will plug in (a sample field naming the tiles of one image).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from toolkit import registry
from toolkit.data.markup import FRAME_SEP, IMAGE, IMG_END, IMG_START, MARKUP_TOKENS, VID_END, VID_START
from toolkit.errors import ChimeraError, did_you_mean

if TYPE_CHECKING:  # transformers stays out of import time (components import this module)
    from transformers import PreTrainedTokenizerBase

HUMAN = "human"
GPT = "gpt"
ROLES = {HUMAN: "user", GPT: "assistant"}
DEFAULT_TEMPLATE = "vicuna_v1"
DEFAULT_LAYOUT = "longllava"

Message = dict[str, str]


@dataclass(frozen=True)
class Encoded:
    """One conversation as tokens, before image-slot expansion.

    ``ids`` are the token ids (each ``<image>`` still one id); ``mask[i]`` is True where the loss trains;
    ``targets[k]`` is the text the mask covers for the ``k``-th assistant turn.
    """

    ids: list[int]
    mask: list[bool]
    targets: list[str]


@dataclass(frozen=True)
class Layout:
    """How a template writes images and videos around the ``<image>`` placeholders (each marker is one control
    token or empty)::

        image:  image_start <image> image_end
        video:  video_start image frame_sep image frame_sep ... image video_end   (one image per frame)

    ``longllava`` (LongLLaVA, arXiv 2409.02889; its ``cli.py`` writes videos so) is the default; ``llava``
    writes the bare placeholder (LLaVA-1.5 and LLaVA-NeXT-Video: a video's frame tokens follow each other).
    """

    name: str
    image_start: str = ""
    image_end: str = ""
    video_start: str = ""
    frame_sep: str = ""
    video_end: str = ""

    @property
    def markers(self) -> tuple[str, ...]:
        """The non-empty markers, each once, in field order."""
        fields = (self.image_start, self.image_end, self.video_start, self.frame_sep, self.video_end)
        return tuple(dict.fromkeys(m for m in fields if m))

    def image(self) -> str:
        return self.image_start + IMAGE + self.image_end

    def video(self, n_frames: int) -> str:
        return self.video_start + self.frame_sep.join([self.image()] * n_frames) + self.video_end

    def __repr__(self) -> str:
        if LAYOUTS.get(self.name) == self:
            return repr(self.name)
        fields = ("image_start", "image_end", "video_start", "frame_sep", "video_end")
        return "{" + ", ".join(f"{k}: {getattr(self, k)!r}" for k in ("name", *fields)) + "}"


LAYOUTS = {
    "longllava": Layout("longllava", IMG_START, IMG_END, VID_START, FRAME_SEP, VID_END),
    "llava": Layout("llava"),
}
_LAYOUT_FIELDS = ("image_start", "image_end", "video_start", "frame_sep", "video_end")


def build_layout(layout: Any = None, where: str = "data.template.layout") -> Layout:
    """``None`` -> ``longllava``; a name -> that preset; a mapping -> a preset (``name:``, default
    ``longllava``) with some markers replaced (``{name: llava, image_start: "<im_start>", ...}``)."""
    if isinstance(layout, Layout):
        return layout
    if layout is None:
        return LAYOUTS[DEFAULT_LAYOUT]
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ChimeraError(
                f"{where}: unknown layout '{layout}'{did_you_mean(layout, LAYOUTS)}; layouts: "
                f"{', '.join(LAYOUTS)}, or a mapping of markers ({', '.join(_LAYOUT_FIELDS)})",
                key=where,
            )
        return LAYOUTS[layout]
    if not isinstance(layout, Mapping):
        raise ChimeraError(
            f"{where}: expected a layout name ({', '.join(LAYOUTS)}) or a mapping of markers, got {layout!r:.60}",
            key=where,
        )
    fields = dict(layout)
    base = build_layout(fields.pop("name", DEFAULT_LAYOUT), f"{where}.name")
    for key, value in fields.items():
        if key not in _LAYOUT_FIELDS:
            raise ChimeraError(
                f"{where}.{key}: unknown layout key{did_you_mean(key, _LAYOUT_FIELDS)}; keys: name, "
                f"{', '.join(_LAYOUT_FIELDS)}",
                key=f"{where}.{key}",
            )
        if value is None:
            fields[key] = ""
        elif not isinstance(value, str) or IMAGE in value or any(c.isspace() for c in value):
            raise ChimeraError(
                f"{where}.{key}: a marker is one control token without spaces (e.g. '<img>') or empty, got "
                f"{value!r:.40}",
                key=f"{where}.{key}",
            )
    custom = {k: fields.get(k, getattr(base, k)) for k in _LAYOUT_FIELDS}
    if all(custom[k] == getattr(base, k) for k in _LAYOUT_FIELDS):
        return base
    return Layout(f"{base.name}*", **custom)


def check_markers(template: Any, tokenizer: PreTrainedTokenizerBase, where: str = "data.template") -> None:
    """Each marker of the template's layout must be one known token of ``tokenizer`` (the word-level tokenizer
    adds them; a pretrained one must have them as special tokens), or the layout would write text."""
    layout = getattr(template, "layout", None)
    if not isinstance(layout, Layout):
        return
    for marker in layout.markers:
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id):
            raise ChimeraError(
                f"{where}.layout: marker '{marker}' is not one token of the tokenizer ({len(ids)} token(s)"
                f"{', unknown' if len(ids) == 1 else ''}); add it to the tokenizer as a special token",
                key=f"{where}.layout",
            )


def _videos(frames: Any, n_images: int, where: str) -> dict[int, tuple[int, int]]:
    """``frames`` checked -> {image index: (position in its video, frames of that video)}."""
    bad = (
        f"{where}: 'frames' must be a list of lists of image indices (one list per video), got {frames!r:.80}"
    )
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
        raise ChimeraError(bad)
    out: dict[int, tuple[int, int]] = {}
    for v, group in enumerate(frames):
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence) or len(group) == 0:
            raise ChimeraError(bad)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in group):
            raise ChimeraError(bad)
        if any(b != a + 1 for a, b in zip(group, group[1:])):
            raise ChimeraError(
                f"{where}: 'frames' video {v} is {list(group)!r:.60}; a video's frames are consecutive images "
                "in ascending order"
            )
        if group[0] < 0 or group[-1] >= n_images:
            raise ChimeraError(
                f"{where}: 'frames' video {v} names images {group[0]}..{group[-1]} but the conversation has "
                f"{n_images} '{IMAGE}' placeholder(s)"
            )
        for pos, i in enumerate(group):
            if i in out:
                raise ChimeraError(f"{where}: 'frames': image {i} belongs to two videos")
            out[i] = (pos, len(group))
    return out


def _render(messages: list[Message], layout: Layout, frames: Any, where: str) -> None:
    """Write the layout's markup around the placeholders of the user messages, in place."""
    if not frames:
        image = layout.image()
        for m in messages:
            if m["role"] == "user" and image != IMAGE:
                m["content"] = m["content"].replace(IMAGE, image)
        return
    users = [m for m in messages if m["role"] == "user"]
    videos = _videos(frames, sum(m["content"].count(IMAGE) for m in users), where)
    k = 0  # image index
    for m in users:
        pieces = m["content"].split(IMAGE)
        out = [pieces[0]]
        for j, text in enumerate(pieces[1:]):
            pos, n = videos.get(k, (None, 0))
            if pos is None:
                out.append(layout.image())
            else:
                if pos == 0:
                    out.append(layout.video_start)
                else:
                    between = out.pop()  # the text since the previous frame
                    if j == 0 or between.strip():
                        raise ChimeraError(
                            f"{where}: 'frames': image {k} is a frame of the same video as image {k - 1} but "
                            f"{'starts another human turn' if j == 0 else f'text ({between.strip()!r:.30}) separates them'}"
                            "; a video's placeholders follow each other"
                        )
                    out.append(layout.frame_sep)
                out.append(layout.image())
                if pos == n - 1:
                    out.append(layout.video_end)
            out.append(text)
            k += 1
        m["content"] = "".join(out)


def conversation_messages(
    conversations: Sequence[Mapping[str, Any]],
    where: str,
    forbidden: Sequence[str] = MARKUP_TOKENS,
    layout: Layout | str | Mapping[str, Any] | None = None,
    frames: Sequence[Sequence[int]] | None = None,
) -> list[Message]:
    """Check a LLaVA conversation and return it as chat messages with the layout's image markup.

    Args:
        conversations: alternating ``{"from": "human"|"gpt", "value": str}`` turns, starting with human and
            ending with gpt. ``<image>`` placeholders may appear in human turns only.
        where: names the sample in errors, e.g. ``"data.train sample 'abc'"``.
        forbidden: markup that must not be typed into any turn's text (the template's control tokens and
            the tokenizer's special tokens); ``<image>`` is always allowed in human turns.
        layout: how images and videos are written (``Layout`` or what ``build_layout`` takes; None:
            ``longllava``).
        frames: the sample's ``frames`` (which images are frames of one video; see the module docstring).

    Returns:
        ``[{"role": "user", "content": "<img><image></img>\\nwhat ..."}, {"role": "assistant", ...}, ...]``
    """
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise ChimeraError(
            f"{where}: 'conversations' must be a list of turns, got {type(conversations).__name__}"
        )
    if len(conversations) == 0:
        raise ChimeraError(f"{where}: 'conversations' is empty; expected alternating human/gpt turns")
    typed = _markup_pattern(tuple(forbidden))
    messages: list[Message] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ChimeraError(
                f"{where}: turn {i}: expected a mapping with 'from' and 'value', got {turn!r:.80}"
            )
        speaker, value = turn["from"], turn["value"]
        if speaker not in ROLES:
            raise ChimeraError(f"{where}: turn {i}: 'from' is {speaker!r}; expected '{HUMAN}' or '{GPT}'")
        if not isinstance(value, str):
            raise ChimeraError(f"{where}: turn {i}: 'value' must be a string, got {type(value).__name__}")
        expected = HUMAN if i % 2 == 0 else GPT
        if speaker != expected:
            what = (
                "two 'human' turns in a row"
                if speaker == HUMAN
                else "a 'gpt' turn without a 'human' turn before it"
            )
            raise ChimeraError(f"{where}: turn {i}: {what}; turns must alternate human, gpt, human, ...")
        if speaker == GPT and IMAGE in value:
            raise ChimeraError(
                f"{where}: turn {i}: '{IMAGE}' in a 'gpt' turn; images belong in 'human' turns"
            )
        found = typed.search(value) if typed is not None else None
        if found is not None:
            raise ChimeraError(
                f"{where}: turn {i}: markup '{found.group()}' typed into the text of a '{speaker}' turn; only "
                f"the template writes markup (the one placeholder a dataset may write is '{IMAGE}', in "
                "'human' turns): remove or escape it in the data"
            )
        messages.append({"role": ROLES[speaker], "content": value})
    if len(conversations) % 2 == 1:
        raise ChimeraError(
            f"{where}: turn {len(conversations) - 1}: the conversation ends with a 'human' turn; "
            "expected a 'gpt' answer after it"
        )
    _render(messages, build_layout(layout), frames, where)
    return messages


@lru_cache(maxsize=64)
def _markup_pattern(forbidden: tuple[str, ...]) -> re.Pattern | None:
    """One regex matching any markup that may not be typed (``<image>`` aside), longest first; a tokenizer
    may have hundreds of special tokens, and one search beats hundreds of substring tests."""
    tokens = sorted({t for t in forbidden if t and t != IMAGE}, key=lambda t: (-len(t), t))
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


_FORBIDDEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forbidden_markup(template: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Strings no turn may contain: the image markup, the tokenizer's special tokens, the template's own.

    Cached per tokenizer (and its size, which grows when tokens are added): reading ``all_special_tokens``
    costs more than encoding a short sample.
    """
    markup = tuple(getattr(template, "markup", ()))
    key = (len(tokenizer), markup)
    try:
        cached = _FORBIDDEN.get(tokenizer)
    except TypeError:  # not weak-referenceable / hashable: no cache
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    specials = [t for t in getattr(tokenizer, "all_special_tokens", ()) if isinstance(t, str)]
    value = tuple(dict.fromkeys([*MARKUP_TOKENS, *specials, *markup]))
    with contextlib.suppress(TypeError):
        _FORBIDDEN[tokenizer] = (key, value)
    return value


def encode_segments(segments: Sequence[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase) -> Encoded:
    """Tokenize the concatenated segments once; a token is a target when it overlaps a target segment.

    The overlap rule is transformers' own for ``return_assistant_tokens_mask``: a token straddling the
    boundary counts as a target (the collator's count check reports it when that changes the token count).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ChimeraError(
            "a fast tokenizer (tokenizer.json) is needed; load it with toolkit.data.load_tokenizer"
        )
    text, spans, targets, start = [], [], [], 0
    for piece, is_target in segments:
        if not piece:
            continue
        if is_target:
            spans.append((start, start + len(piece)))
            targets.append(piece)
        text.append(piece)
        start += len(piece)
    out = tokenizer("".join(text), add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(out["input_ids"]), out["offset_mapping"]
    mask = [False] * len(ids)
    k = 0
    for i, (tok_start, tok_end) in enumerate(offsets):
        while k < len(spans) and tok_start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[i] = tok_end > spans[k][0]
    return Encoded(ids, mask, targets)


class ChatTemplate:
    """Base of templates written as text segments: subclasses implement ``segments`` (and set ``markup``).

    ``segments(messages, tokenizer)`` returns ``[(text, is_target), ...]`` whose concatenation is the prompt;
    each assistant turn contributes exactly one target segment (its answer and end-of-turn token).
    """

    name = ""
    markup: tuple[str, ...] = ()  # the template's own control tokens (an instance adds its layout's)
    layout: Layout = LAYOUTS[DEFAULT_LAYOUT]

    def __init__(self, layout: str | dict[str, str | None] | None = DEFAULT_LAYOUT):
        set_layout(self, layout)

    def words(self) -> list[str]:
        """Plain words the template writes (added to every word-level vocabulary)."""
        return []

    def segments(
        self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase
    ) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def encode(
        self,
        conversations: Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        where: str,
        frames: Sequence[Sequence[int]] | None = None,
    ) -> Encoded:
        forbidden = forbidden_markup(self, tokenizer)
        messages = conversation_messages(conversations, where, forbidden, self.layout, frames)
        return encode_segments(self.segments(messages, tokenizer), tokenizer)

    @classmethod
    def validate_config(cls, kwargs: Mapping[str, Any], where: str) -> None:
        """Config-time check of ``layout`` (nothing built)."""
        build_layout(kwargs.get("layout"), f"{where}.layout")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "markup")
        return f"{type(self).__name__}({args})"


def set_layout(template: Any, layout: Any) -> None:
    """Give a template its layout; markers the tokenizers do not already know (``MARKUP_TOKENS``) join its
    ``markup`` (one token each in a word-level vocabulary, refused inside a turn's text)."""
    template.layout = build_layout(layout, "layout")
    own = type(template).markup
    extra = [m for m in template.layout.markers if m not in MARKUP_TOKENS and m not in own]
    if extra:
        template.markup = (*own, *extra)


_default: Any = None


def build_template(template: Any = None, where: str = "data.template") -> Any:
    """``None`` -> ``vicuna_v1``; a name or a ``{name: ..., **kwargs}`` node -> the registered template;
    an already built template (anything with ``encode``) is returned as is."""
    global _default
    if template is None:  # the default is built once (encode() without a template builds it per sample)
        if _default is None:
            _default = registry.build("template", DEFAULT_TEMPLATE, where)
        return _default
    if isinstance(template, (str, Mapping)):  # OmegaConf's DictConfig is a Mapping too
        return registry.build("template", template, where)
    if callable(getattr(template, "encode", None)):
        return template
    raise ChimeraError(
        f"{where}: expected a template name or a mapping with 'name:', got {template!r:.80}", key=where
    )


def template_name(template: Any) -> str:
    return getattr(template, "name", "") or type(template).__name__
