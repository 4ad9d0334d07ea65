"""Tokenizers: special tokens, an offline word-level tokenizer, and loading a local pretrained one.

Every dataset meets one interface, ``transformers.PreTrainedTokenizerFast``. Synthetic data uses a word-level
tokenizer built here with the ``tokenizers`` library from the generator's vocabulary (no download); real runs
point ``load_tokenizer`` at a local directory holding a Hugging Face tokenizer, and the markup tokens the
prompt template needs (``<image>``, ``<img>``, ...) are added to it when missing.

Markup follows LongLLaVA (arXiv 2409.02889): each image is written ``<img><image></img>``, a video
``<vid>`` frames separated by ``<t>`` ``</vid>``. ``<image>`` is a placeholder the collator expands into as
many copies of its id as the image produces tokens (see ``toolkit.data.collate``).

Note for model builders: tokens added to a pretrained tokenizer extend it past ``tokenizer.vocab_size``; size
embeddings with ``len(tokenizer)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from toolkit.errors import ChimeraError

PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
IMAGE = "<image>"  # placeholder, expanded to the image's tokens by the collator
IMG_START = "<img>"
IMG_END = "</img>"
VID_START = "<vid>"
VID_END = "</vid>"
FRAME_SEP = "<t>"

# Fixed order: the word-level tokenizer gives these ids 0..9.
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE, IMG_START, IMG_END, VID_START, VID_END, FRAME_SEP)
# The markup every tokenizer must know as one unsplittable token each.
MARKUP_TOKENS = (IMAGE, IMG_START, IMG_END, VID_START, VID_END, FRAME_SEP)


def split_words(words: Iterable[str]) -> list[str]:
    """Lower-cased pieces of ``words`` as the word-level tokenizer sees them ("USER:" -> "user", ":")."""
    pre = pre_tokenizers.Whitespace()
    out = []
    for word in words:
        out.extend(piece for piece, _ in pre.pre_tokenize_str(str(word).lower()))
    return out


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` plus the prompt template's words and all special tokens.

    Ids are deterministic: the special tokens take 0..9 in ``SPECIAL_TOKENS`` order, then the sorted,
    lower-cased vocabulary. Text is lower-cased and split on whitespace and punctuation (``Whitespace``
    pre-tokenizer, so "USER:" -> "user", ":"); anything unknown maps to ``<unk>``.
    """
    from toolkit.data.conversation import template_words  # conversation imports this module's constants

    specials = set(SPECIAL_TOKENS)
    vocab_words = sorted(set(split_words([*words, *template_words()])) - specials)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocab_words])}

    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Special tokens are matched on the raw text before normalisation and never split.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    _register_markup(tok)
    return tok


def _register_markup(tok: PreTrainedTokenizerBase) -> None:
    """Mark the markup tokens special (never split, skipped by ``decode(skip_special_tokens=True)``).

    ``additional_special_tokens`` and the positional "do not replace" flag work in transformers 4.x and 5.x.
    """
    tok.add_special_tokens({"additional_special_tokens": list(MARKUP_TOKENS)}, False)
    tok.padding_side = "right"


def load_tokenizer(path: str | os.PathLike | None, words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """``None`` -> ``build_word_tokenizer(words)``; a local directory -> that tokenizer plus missing markup.

    A pretrained tokenizer gets the markup tokens (``<image>``, ``<img>``, ...) registered as special tokens
    (added to the vocabulary when missing), and ``<pad>`` / ``</s>`` when it has no pad / eos token. Nothing
    is downloaded.
    """
    if path is None:
        return build_word_tokenizer(words)
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
