"""Prompt template, target masks, image-slot expansion, truncation and batching."""

from __future__ import annotations

import pytest
import torch

from toolkit.data.collate import IGNORE_INDEX, Collator, encode
from toolkit.data.conversation import render
from toolkit.data.tokenizer import IMAGE, IMG_END, IMG_START, build_word_tokenizer, image_token_id
from toolkit.errors import ChimeraError

WORDS = ["what", "color", "is", "the", "shape", "?", "red", "blue", "and", "a", "circle", "describe", "."]
K = 5  # image tokens per image


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


def sample(n_images, question="what color is the shape ?", answer="red", sid="s0", size=8):
    placeholders = " ".join([IMAGE] * n_images)
    images = (
        torch.arange(1, n_images + 1, dtype=torch.float32).view(-1, 1, 1, 1).expand(n_images, 3, size, size)
    )
    return {
        "id": sid,
        "images": images.clone() / 10,
        "conversations": [human(f"{placeholders}\n{question}" if n_images else question), gpt(answer)],
    }


# -- conversation template -----------------------------------------------------------------------------


def test_render_one_turn_exactly():
    segments = render([human(f"{IMAGE}\nwhat color is the shape ?"), gpt("red")], "sample 'x'")
    assert segments == [
        ("<s>", False),
        ("USER: <img><image></img>\nwhat color is the shape ? ASSISTANT:", False),
        (" red</s>", True),
    ]


def test_render_two_turns_targets_only_answers():
    segments = render([human("a ?"), gpt("b"), human("c ?"), gpt("d")], "x", bos=None, eos="[E]")
    assert "".join(t for t, _ in segments) == "USER: a ? ASSISTANT: b[E]USER: c ? ASSISTANT: d[E]"
    assert [t for t, target in segments if target] == [" b[E]", " d[E]"]


@pytest.mark.parametrize(
    "conversations, expected",
    [
        ([], "'conversations' is empty"),
        ("hello", "must be a list"),
        ([human("a"), {"from": "bot", "value": "b"}], "turn 1: 'from' is 'bot'"),
        ([human("a"), human("b")], "turn 1: two 'human' turns in a row"),
        ([gpt("a"), human("b")], "turn 0: a 'gpt' turn without a 'human'"),
        ([human("a"), gpt("b"), human("c")], "turn 2: the conversation ends with a 'human' turn"),
        ([human("a"), gpt(f"b {IMAGE}")], "turn 1: '<image>' in a 'gpt' turn"),
        ([human("a"), {"from": "gpt", "value": 3}], "turn 1: 'value' must be a string"),
        ([human("a"), {"from": "gpt"}], "turn 1: expected a mapping with 'from' and 'value'"),
    ],
)
def test_render_rejects_malformed_conversations(conversations, expected):
    with pytest.raises(ChimeraError) as info:
        render(conversations, "data.train sample 'abc'")
    assert str(info.value).startswith("data.train sample 'abc': ")
    assert expected in str(info.value)


# -- encode ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_encode_expands_each_image_into_exact_slots(tok, n_images):
    out = encode(sample(n_images), tok, image_tokens=K, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    img = image_token_id(tok)
    assert out["n_images"] == n_images
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    assert int((ids == img).sum()) == n_images * K
    # each block is contiguous and wrapped in <img> ... </img>
    start, end = tok.convert_tokens_to_ids(IMG_START), tok.convert_tokens_to_ids(IMG_END)
    starts = (ids == start).nonzero().flatten().tolist()
    assert len(starts) == n_images
    for s in starts:
        assert ids[s + 1 : s + 1 + K].eq(img).all() and int(ids[s + 1 + K]) == end
    # labels: only the answer and </s>, everything else (BOS, prompt, image slots) ignored
    assert labels[ids == img].eq(IGNORE_INDEX).all()
    targets = labels[labels != IGNORE_INDEX].tolist()
    assert targets == [tok.convert_tokens_to_ids("red"), tok.eos_token_id]
    assert ids[-2:].tolist() == targets and int(ids[0]) == tok.bos_token_id


def test_encode_multi_turn_labels(tok):
    s = sample(1)
    s["conversations"] += [human("describe the shape ."), gpt("a blue circle")]
    out = encode(s, tok, image_tokens=K, max_length=512)
    target_tokens = tok.convert_ids_to_tokens(out["labels"][out["labels"] != IGNORE_INDEX].tolist())
    assert target_tokens == ["red", "</s>", "a", "blue", "circle", "</s>"]


@pytest.mark.parametrize("n_placeholders, n_images", [(2, 1), (0, 1), (1, 0)])
def test_placeholder_image_mismatch_names_sample_and_counts(tok, n_placeholders, n_images):
    s = sample(n_images, sid="row-42")
    placeholders = " ".join([IMAGE] * n_placeholders)
    s["conversations"][0]["value"] = f"{placeholders} what color is the shape ?"
    with pytest.raises(ChimeraError) as info:
        encode(s, tok, image_tokens=K, max_length=512, where="data.val")
    msg = str(info.value)
    assert "data.val sample 'row-42'" in msg
    assert f"{n_placeholders} '<image>' placeholders" in msg and f"but {n_images} images" in msg


def test_truncation_never_cuts_an_image(tok):
    s = sample(2, sid="long-1")
    full = encode(s, tok, image_tokens=K, max_length=512)["input_ids"].shape[0]
    last_image = int((encode(s, tok, K, 512)["input_ids"] == image_token_id(tok)).nonzero().max())
    with pytest.raises(ChimeraError) as info:
        encode(s, tok, image_tokens=K, max_length=last_image, where="data.train")
    msg = str(info.value)
    assert "sample 'long-1'" in msg and f"{full} tokens" in msg and f"data.max_length={last_image}" in msg
    assert "raise data.max_length" in msg
    # cutting text after the last image is fine
    out = encode(s, tok, image_tokens=K, max_length=last_image + 2)
    assert out["input_ids"].shape[0] == out["labels"].shape[0] == last_image + 2


def test_encode_rejects_bad_images(tok):
    s = sample(1)
    s["images"] = torch.zeros(1, 8, 8)
    with pytest.raises(ChimeraError, match="sample 's0': 'images' must be a float tensor"):
        encode(s, tok, K, 512)


# -- Collator --------------------------------------------------------------------------------------------


def test_collator_batch_contract(tok):
    samples = [sample(1, sid="a"), sample(0, answer="a blue circle", sid="b"), sample(3, sid="c")]
    batch = Collator(tok, image_tokens=K, max_length=512)(samples)
    enc = [encode(s, tok, K, 512) for s in samples]
    lengths = [e["input_ids"].shape[0] for e in enc]
    B, T = 3, max(lengths)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "images", "n_target_tokens"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (B, T)
    for i, (e, n) in enumerate(zip(enc, lengths)):
        assert torch.equal(batch["input_ids"][i, :n], e["input_ids"])
        assert batch["input_ids"][i, n:].eq(tok.pad_token_id).all()
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
    # images concatenated in placeholder order: sample a (value .1), then c (.1, .2, .3)
    assert batch["images"].shape == (4, 3, 8, 8)
    assert batch["images"][:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.1, 0.2, 0.3])
    assert int((batch["input_ids"] == image_token_id(tok)).sum()) == 4 * K
    # answers + </s>: 2 + 4 + 2 target tokens, none at position 0
    assert batch["n_target_tokens"].ndim == 0 and int(batch["n_target_tokens"]) == 8
    assert int(batch["n_target_tokens"]) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_collator_without_images(tok):
    batch = Collator(tok, image_tokens=K, max_length=512)([sample(0), sample(0, sid="t")])
    assert batch["images"] is None


def test_collator_rejects_mixed_image_sizes(tok):
    with pytest.raises(ChimeraError, match="'small' \\(3, 8, 8\\).*'big' \\(3, 16, 16\\)"):
        Collator(tok, K, 512)([sample(1, sid="small"), sample(1, sid="big", size=16)])
