"""Prompt templates: LLaVA conversations -> token ids plus a mask of the assistant tokens the loss trains on.

A template is a registered component (kind ``template``, in ``components/templates/``) chosen per experiment
with ``data.template`` (default ``{name: vicuna_v1}``). This module holds what every template shares:

- ``conversation_messages``: checks a LLaVA conversation (``[{"from": "human"|"gpt", "value": str}, ...]``)
  and turns it into chat messages ``[{"role": "user"|"assistant", "content": str}, ...]``, with each
  ``<image>`` written ``<img><image></img>`` (LongLLaVA's markup) and markup typed into the text rejected.
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
    encode(conversations, tokenizer, where) -> Encoded

``Encoded.targets`` holds, per assistant turn, the text its mask covers (the answer and its end-of-turn
token); the collator checks that the marked tokens are exactly the tokens of those texts, so a template that
masks the wrong span fails loudly, naming the sample, instead of training on the wrong tokens.

Image placeholders stay placeholders here: expanding each ``<image>`` into the image's token slots is the
collator's job (``toolkit.data.collate``).
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
from toolkit.data.markup import IMAGE, IMG_END, IMG_START, MARKUP_TOKENS
from toolkit.errors import ChimeraError

if TYPE_CHECKING:  # transformers stays out of import time (components import this module)
    from transformers import PreTrainedTokenizerBase

HUMAN = "human"
GPT = "gpt"
ROLES = {HUMAN: "user", GPT: "assistant"}
DEFAULT_TEMPLATE = "vicuna_v1"

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


def conversation_messages(
    conversations: Sequence[Mapping[str, Any]], where: str, forbidden: Sequence[str] = MARKUP_TOKENS
) -> list[Message]:
    """Check a LLaVA conversation and return it as chat messages with ``<img><image></img>`` markup.

    Args:
        conversations: alternating ``{"from": "human"|"gpt", "value": str}`` turns, starting with human and
            ending with gpt. ``<image>`` placeholders may appear in human turns only.
        where: names the sample in errors, e.g. ``"data.train sample 'abc'"``.
        forbidden: markup that must not be typed into any turn's text (the template's control tokens and
            the tokenizer's special tokens); ``<image>`` is always allowed in human turns.

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
        if speaker == HUMAN:
            value = value.replace(IMAGE, IMG_START + IMAGE + IMG_END)
        messages.append({"role": ROLES[speaker], "content": value})
    if len(conversations) % 2 == 1:
        raise ChimeraError(
            f"{where}: turn {len(conversations) - 1}: the conversation ends with a 'human' turn; "
            "expected a 'gpt' answer after it"
        )
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
    markup: tuple[str, ...] = ()

    def words(self) -> list[str]:
        """Plain words the template writes (added to every word-level vocabulary)."""
        return []

    def segments(
        self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase
    ) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def encode(
        self, conversations: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, where: str
    ) -> Encoded:
        messages = conversation_messages(conversations, where, forbidden_markup(self, tokenizer))
        return encode_segments(self.segments(messages, tokenizer), tokenizer)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


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
