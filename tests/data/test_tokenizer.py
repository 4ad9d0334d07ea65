"""Tokenizers: special ids, round trips, determinism, loading a local pretrained tokenizer."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from toolkit.data.tokenizer import (
    BOS,
    EOS,
    IMAGE,
    IMG_END,
    IMG_START,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    build_word_tokenizer,
    image_token_id,
    load_tokenizer,
)
from toolkit.errors import ChimeraError

WORDS = ["what", "color", "is", "the", "shape", "?", "red", "blue", "circle"]


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


def test_special_tokens_have_fixed_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (PAD, BOS, EOS, UNK)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert image_token_id(tok) == SPECIAL_TOKENS.index(IMAGE)
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)


def test_ids_are_deterministic_and_sorted():
    shuffled = list(WORDS)
    random.Random(0).shuffle(shuffled)
    a, b = build_word_tokenizer(WORDS), build_word_tokenizer(shuffled + ["red"])
    assert a.get_vocab() == b.get_vocab()
    words = [w for w, _ in sorted(a.get_vocab().items(), key=lambda kv: kv[1])][len(SPECIAL_TOKENS) :]
    assert words == sorted(words)


def test_round_trip_and_template_words(tok):
    text = f"{BOS}USER: {IMG_START}{IMAGE}{IMG_END}\nwhat color is the shape ? ASSISTANT: red{EOS}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids) == [
        BOS, "user", ":", IMG_START, IMAGE, IMG_END, "what", "color", "is", "the", "shape", "?",
        "assistant", ":", "red", EOS,
    ]  # fmt: skip
    assert (
        tok.decode(ids)
        == f"{BOS} user : {IMG_START} {IMAGE} {IMG_END} what color is the shape ? assistant : red {EOS}"
    )
    assert tok.decode(ids, skip_special_tokens=True) == "user : what color is the shape ? assistant : red"


def test_lowercase_and_unknown_words(tok):
    assert (
        tok("What COLOR", add_special_tokens=False)["input_ids"]
        == tok("what color", add_special_tokens=False)["input_ids"]
    )
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path, words=["ignored"])
    assert loaded.get_vocab() == tok.get_vocab()
    text = f"{IMG_START}{IMAGE}{IMG_END} what color is it ?{EOS}"
    assert (
        loaded(text, add_special_tokens=False)["input_ids"]
        == tok(text, add_special_tokens=False)["input_ids"]
    )
    assert load_tokenizer(None, WORDS).get_vocab() == tok.get_vocab()


def test_load_adds_missing_markup_and_pad(tmp_path):
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[EOS]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken("[EOS]", special=True)])
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(
        tmp_path
    )

    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == PAD and tok.pad_token_id is not None
    assert tok.eos_token == "[EOS]"
    ids = tok(f"hello {IMG_START}{IMAGE}{IMG_END} world", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["hello", IMG_START, IMAGE, IMG_END, "world"]
    assert image_token_id(tok) == ids[2]
    assert len(tok) > 4  # embeddings must be sized with len(tokenizer)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ChimeraError, match="nope"):
        load_tokenizer(missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ChimeraError, match="empty_dir"):
        load_tokenizer(empty)


def test_image_token_id_requires_the_placeholder():
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ChimeraError, match="<image>"):
        image_token_id(tok)


# -- the prompt template's words and control tokens --------------------------------------------------------


def test_default_template_words_only(tok):
    """vicuna_v1 adds its words (USER, :, ASSISTANT) and no control token: the vocabulary is unchanged."""
    expected = sorted(set(WORDS) | {"user", ":", "assistant"})
    assert [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])] == [
        *SPECIAL_TOKENS,
        *expected,
    ]
    assert build_word_tokenizer(WORDS, template={"name": "vicuna_v1"}).get_vocab() == tok.get_vocab()


def test_template_control_tokens_follow_the_special_tokens():
    tok = build_word_tokenizer(WORDS, template="chatml")
    n = len(SPECIAL_TOKENS)
    assert tok.convert_ids_to_tokens([n, n + 1]) == ["<|im_start|>", "<|im_end|>"]
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)
    # Qwen2's default system prompt is in the vocabulary; control tokens are never split
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nwhat ?<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[:3] == ["<|im_start|>", "system", "you"]
    both = build_word_tokenizer(WORDS, template=["llama3", {"name": "jamba"}])
    assert {"<|eot_id|>", "<|User|>", "<|Assistant|>"} <= set(both.get_vocab())
    assert load_tokenizer(None, WORDS, template="chatml").get_vocab() == tok.get_vocab()


def test_unknown_template_is_a_config_error():
    with pytest.raises(
        ChimeraError, match="data.template.name: unknown template 'lama3'.*did you mean 'llama3'"
    ):
        build_word_tokenizer(WORDS, template="lama3")
