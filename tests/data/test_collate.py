"""Target masks, image-slot expansion, the target check, truncation and batching."""

from __future__ import annotations

import pytest
import torch

from toolkit.data.collate import IGNORE_INDEX, Collator, encode
from toolkit.data.template import ChatTemplate, Encoded, build_template
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
    assert set(batch) == {"input_ids", "labels", "attention_mask", "images", "n_truncated", "n_skipped"}
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
    assert (
        int((batch["labels"] != IGNORE_INDEX).sum())
        == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        == 8
    )
    assert batch["n_truncated"].ndim == 0 and int(batch["n_truncated"]) == 0


def test_collator_without_images(tok):
    batch = Collator(tok, image_tokens=K, max_length=512)([sample(0), sample(0, sid="t")])
    assert batch["images"] is None


def test_collator_rejects_mixed_image_sizes(tok):
    with pytest.raises(ChimeraError, match="'small' \\(3, 8, 8\\).*'big' \\(3, 16, 16\\)"):
        Collator(tok, K, 512)([sample(1, sid="small"), sample(1, sid="big", size=16)])


def test_collator_counts_truncated_samples(tok):
    s = sample(1, answer="a blue circle", sid="cut")
    full = encode(s, tok, K, 512)["input_ids"].shape[0]
    batch = Collator(tok, K, max_length=full - 1)([s, sample(0, sid="short"), s])
    assert int(batch["n_truncated"]) == 2 and batch["input_ids"].shape[1] == full - 1
    assert encode(s, tok, K, full - 1)["truncated"] and not encode(s, tok, K, full)["truncated"]


# -- templates and the target check ------------------------------------------------------------------------


def test_default_template_keeps_the_segment_wise_ids(tok):
    """vicuna_v1 tokenizes the whole prompt at once; ids and labels equal the old per-segment encoding."""
    s = sample(2, sid="two")
    s["conversations"] += [human("describe the shape ."), gpt("a blue circle")]
    out = encode(s, tok, image_tokens=1, max_length=512)
    q1 = "<img><image></img> <img><image></img>\nwhat color is the shape ?"
    segments = [("<s>", False), (f"USER: {q1} ASSISTANT:", False), (" red</s>", True)]
    segments += [("USER: describe the shape . ASSISTANT:", False), (" a blue circle</s>", True)]
    ids, labels = [], []
    for text, target in segments:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    assert out["input_ids"].tolist() == ids and out["labels"].tolist() == labels


def test_template_argument_selects_the_prompt_format():
    tok3 = build_word_tokenizer(WORDS, template="llama3")
    s = sample(1)
    for template in ("llama3", {"name": "llama3"}):
        out = encode(s, tok3, K, 512, template=template)
        tokens = tok3.convert_ids_to_tokens(out["input_ids"].tolist())
        assert tokens[:4] == ["<s>", "<|start_header_id|>", "user", "<|end_header_id|>"]
        targets = tok3.convert_ids_to_tokens(out["labels"][out["labels"] != IGNORE_INDEX].tolist())
        assert targets == ["red", "<|eot_id|>"]
    batch = Collator(tok3, K, 512, template="llama3")([s])
    assert torch.equal(batch["input_ids"][0], encode(s, tok3, K, 512, template="llama3")["input_ids"])


@pytest.mark.parametrize(
    "turn, value, markup",
    [(0, "look: <img> what color is the shape ?", "<img>"), (1, "red</s>", "</s>"), (1, "<s> red", "<s>")],
)
def test_markup_typed_into_text_names_the_sample(tok, turn, value, markup):
    s = sample(1, sid="typed-7")
    s["conversations"][turn]["value"] = value if turn else f"{IMAGE} {value}"
    with pytest.raises(ChimeraError) as info:
        Collator(tok, K, 512, where="data.train")([sample(0), s])
    msg = str(info.value)
    assert (
        msg.startswith("data.train sample 'typed-7': turn ")
        and f"markup '{markup}' typed into the text" in msg
    )


class _Shifted(ChatTemplate):
    """vicuna-like, but the target segment starts inside the prompt ('ASSISTANT:' is trained on)."""

    name = "shifted"

    def segments(self, messages, tokenizer):
        out = [(tokenizer.bos_token, False)]
        for m in messages:
            if m["role"] == "user":
                out.append(("USER: " + m["content"], False))
            else:
                out.append((" ASSISTANT: " + m["content"] + tokenizer.eos_token, True))
        return out


class _Overmarked:
    """Computes ids and mask itself (as 'hf' does) and also marks BOS: the texts hold only the answers."""

    name = "overmarked"
    markup = ()

    def words(self):
        return []

    def encode(self, conversations, tokenizer, where):
        encoded = build_template("vicuna_v1").encode(conversations, tokenizer, where)
        return Encoded(encoded.ids, [True, *encoded.mask[1:]], encoded.targets)


class _Silent(ChatTemplate):
    """Marks nothing: the silent mask a chat template without {% generation %} would give."""

    name = "silent"

    def segments(self, messages, tokenizer):
        return [(m["content"] + " ", False) for m in messages]


@pytest.mark.parametrize(
    "template, expected",
    [
        (_Shifted(), "target span 0 is ' ASSISTANT: red</s>', which holds 'ASSISTANT:' besides answer 0"),
        (
            _Overmarked(),
            "marks 3 target tokens but the assistant answers (with their end-of-turn tokens) are 2",
        ),
        (_Silent(), "marks 0 target span(s) but the conversation has 1 'gpt' answer(s)"),
    ],
)
def test_targets_other_than_the_answers_are_an_error(tok, template, expected):
    s = sample(1, sid="row-9")
    with pytest.raises(ChimeraError) as info:
        encode(s, tok, K, 512, where="data.val", template=template)
    assert str(info.value).startswith("data.val sample 'row-9': template ")
    assert expected in str(info.value)
    with pytest.raises(ChimeraError, match="data.template '.*' on a minimal sample 'probe'"):
        Collator(tok, K, 512, template=template)


def test_skipped_samples_are_counted_in_the_batch():
    """A dataset under on_bad_sample: skip marks replacement samples; the batch carries their count."""
    from components.datasets.synthetic_shapes import SyntheticShapes
    from toolkit.data.collate import Collator
    from toolkit.data.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(SyntheticShapes.vocabulary())
    data = SyntheticShapes(size=3, image_size=8, tasks=["color"])
    samples = [data[0], {**data[1], "skipped": 1}, {**data[2], "skipped": 1}]
    assert int(Collator(tok, 4, 64)(samples)["n_skipped"]) == 2
    assert int(Collator(tok, 4, 64)(samples[:1])["n_skipped"]) == 0
