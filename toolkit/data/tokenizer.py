"""Tokenizers: an offline word-level tokenizer, and loading a local pretrained one.

Every dataset meets one interface, ``transformers.PreTrainedTokenizerFast``. Synthetic data uses a word-level
tokenizer built here with the ``tokenizers`` library from the generator's vocabulary and the prompt template's
own words and control tokens (no download); real runs point ``load_tokenizer`` at a local directory holding a
Hugging Face tokenizer, and the image markup (``<image>``, ``<img>``, ...) is added to it when missing.

The special-token names (``BOS``, ``IMAGE``, ...) live in ``toolkit.data.markup`` and are re-exported here.

Note for model builders: tokens added to a pretrained tokenizer extend it past ``tokenizer.vocab_size``; size
embeddings with ``len(tokenizer)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from toolkit.data.markup import (  # noqa: F401  (re-exported: the names users import from here)
    BOS,
    EOS,
    FRAME_SEP,
    IMAGE,
    IMG_END,
    IMG_START,
    MARKUP_TOKENS,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    VID_END,
    VID_START,
)
from toolkit.data.template import build_template
from toolkit.errors import ChimeraError


def split_words(words: Iterable[str]) -> list[str]:
    """Lower-cased pieces of ``words`` as the word-level tokenizer sees them ("USER:" -> "user", ":")."""
    pre = pre_tokenizers.Whitespace()
    out = []
    for word in words:
        out.extend(piece for piece, _ in pre.pre_tokenize_str(str(word).lower()))
    return out


def _templates(template: Any) -> list[Any]:
    """One template (node, name or object; None is the default) or a list of them -> built templates."""
    if isinstance(template, Sequence) and not isinstance(template, (str, Mapping)):  # a list (or ListConfig)
        return [build_template(t, f"data.template[{i}]") for i, t in enumerate(template)] or [
            build_template()
        ]
    return [build_template(template)]


def build_word_tokenizer(words: Iterable[str], template: Any = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words``, the prompt template's words and control tokens, and all special
    tokens.

    Ids are deterministic: the special tokens take 0..9 in ``SPECIAL_TOKENS`` order, then the template's
    control tokens (``<|im_start|>``, ...; none for ``vicuna_v1``) in the template's order, then the sorted,
    lower-cased vocabulary. Text is lower-cased and split on whitespace and punctuation (``Whitespace``
    pre-tokenizer, so "USER:" -> "user", ":"); anything unknown maps to ``<unk>``.

    Args:
        words: the datasets' vocabulary.
        template: the ``data.template`` node, name or built template (None: ``vicuna_v1``), or a list of them
            when stages use different templates (one vocabulary serves every stage).
    """
    templates = _templates(template)
    specials = set(SPECIAL_TOKENS)
    markup = [m for m in dict.fromkeys(m for t in templates for m in t.markup) if m not in specials]
    template_words = [w for t in templates for w in t.words()]
    vocab_words = sorted(set(split_words([*words, *template_words])) - specials - set(markup))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *markup, *vocab_words])}

    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Special tokens are matched on the raw text before normalisation and never split.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in [*SPECIAL_TOKENS, *markup]]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    _register_markup(tok, markup)
    return tok


def _register_markup(tok: PreTrainedTokenizerBase, extra: Iterable[str] = ()) -> None:
    """Mark the markup tokens (and ``extra`` control tokens) special: never split, skipped by
    ``decode(skip_special_tokens=True)``, and refused when typed into a sample's text.

    ``additional_special_tokens`` and the positional "do not replace" flag work in transformers 4.x and 5.x.
    """
    tok.add_special_tokens({"additional_special_tokens": [*MARKUP_TOKENS, *extra]}, False)
    tok.padding_side = "right"


def load_tokenizer(
    path: str | os.PathLike | None, words: Iterable[str] = (), template: Any = None
) -> PreTrainedTokenizerFast:
    """``None`` -> ``build_word_tokenizer(words, template)``; a local directory -> that tokenizer plus missing
    markup.

    A pretrained tokenizer gets the markup tokens (``<image>``, ``<img>``, ...) registered as special tokens
    (added to the vocabulary when missing), and ``<pad>`` / ``</s>`` when it has no pad / eos token; it must
    already know its prompt template's control tokens (``template`` is only read for the word-level
    tokenizer). Nothing is downloaded.
    """
    if path is None:
        return build_word_tokenizer(words, template)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ChimeraError(
            f"tokenizer '{path}': not a local directory (expected a saved Hugging Face tokenizer)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... depending on what is missing
        raise ChimeraError(f"tokenizer '{path}': cannot be loaded ({type(exc).__name__}: {exc})") from exc
    if not getattr(tok, "is_fast", False):
        raise ChimeraError(
            f"tokenizer '{path}': loaded a slow tokenizer; a fast (tokenizer.json) one is expected"
        )
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD})
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
    _register_markup(tok)
    return tok


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    """The id of the ``<image>`` placeholder (the model scatters image features into these positions)."""
    tid = tok.convert_tokens_to_ids(IMAGE)
    if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id):
        raise ChimeraError(f"tokenizer has no '{IMAGE}' token; build it with toolkit.data.load_tokenizer")
    return int(tid)
