"""Prompt layouts (``data.template.layout``): LongLLaVA's ``<img><image></img>`` (the default, today's ids),
LLaVA's bare ``<image>``, custom markers, and videos (a sample's ``frames``) written ``<vid>...<t>...</vid>``."""

from __future__ import annotations

import pytest
import torch

from toolkit import registry
from toolkit.data.collate import IGNORE_INDEX, Collator, encode
from toolkit.data.markup import IMAGE
from toolkit.data.template import LAYOUTS, build_layout, build_template, conversation_messages
from toolkit.data.tokenizer import build_word_tokenizer, load_tokenizer
from toolkit.errors import ChimeraError

WORDS = ["what", "happens", "and", "here", "?", "red", "it", "fades", "which", "one"]
K = 2  # image tokens per image


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


def video_sample(frames=((1, 2, 3),), sid="v"):
    """One image, then a 3-frame video (as the llava dataset writes a <video>: space-separated <image>s)."""
    n = 4
    return {
        "id": sid,
        "images": torch.rand(n, 3, 8, 8),
        "conversations": [human(f"{IMAGE}\nwhat happens here ? {IMAGE} {IMAGE} {IMAGE}"), gpt("it fades")],
        "frames": [list(f) for f in frames],
    }


def contents(conversations, **kwargs):
    return [m["content"] for m in conversation_messages(conversations, "t", **kwargs) if m["role"] == "user"]


# -- rendering ----------------------------------------------------------------------------------------------


def test_default_is_longllava_and_keeps_todays_ids():
    """The quick start's prompt, vocabulary and ids do not change: no layout, the default and an explicit
    longllava give the same template and tokenizer."""
    from components.datasets.synthetic_shapes import SyntheticShapes

    words = SyntheticShapes.vocabulary()
    default, explicit = (
        build_template("vicuna_v1"),
        build_template({"name": "vicuna_v1", "layout": "longllava"}),
    )
    assert default.layout == explicit.layout == LAYOUTS["longllava"] and default.markup == ()
    tok = build_word_tokenizer(words)
    assert build_word_tokenizer(words, template=explicit).get_vocab() == tok.get_vocab()
    data = SyntheticShapes(size=4, image_size=8, tasks=["color", "shape"])
    for i in range(4):
        a = encode(data[i], tok, 16, 64)
        b = encode(data[i], tok, 16, 64, template=explicit)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert tok.convert_ids_to_tokens(a["input_ids"][:4].tolist()) == ["<s>", "user", ":", "<img>"]


def test_longllava_and_llava_write_images_and_videos():
    conv = video_sample()["conversations"]
    assert contents(conv) == [
        "<img><image></img>\nwhat happens here ? <img><image></img> <img><image></img> <img><image></img>"
    ]
    assert contents(conv, frames=[[1, 2, 3]]) == [
        "<img><image></img>\nwhat happens here ? "
        "<vid><img><image></img><t><img><image></img><t><img><image></img></vid>"
    ]
    assert contents(conv, layout="llava") == ["<image>\nwhat happens here ? <image> <image> <image>"]
    # LLaVA(-NeXT-Video): a video's frame tokens follow each other
    assert contents(conv, layout="llava", frames=[[1, 2, 3]]) == [
        "<image>\nwhat happens here ? <image><image><image>"
    ]
    # a one-frame video, and an image that is a video on its own
    assert contents(conv, frames=[[0], [2, 3]])[0].startswith("<vid><img><image></img></vid>\nwhat")


def test_custom_markers_start_from_a_preset():
    layout = build_layout({"name": "llava", "video_start": "<video_start>", "video_end": "<video_end>"})
    assert layout.markers == ("<video_start>", "<video_end>") and layout.image() == IMAGE
    assert layout.video(2) == "<video_start><image><image><video_end>"
    assert build_layout({"name": "llava"}) is LAYOUTS["llava"] and build_layout(None) is LAYOUTS["longllava"]
    qwen = build_layout({"image_start": "<|vision_start|>", "image_end": "<|vision_end|>", "frame_sep": None})
    assert (
        qwen.video(2)
        == "<vid><|vision_start|><image><|vision_end|><|vision_start|><image><|vision_end|></vid>"
    )


@pytest.mark.parametrize(
    "layout, message",
    [
        ("lava", "data.template.layout: unknown layout 'lava' \\(did you mean 'llava'\\?\\)"),
        (
            {"image_star": "<x>"},
            "data.template.layout.image_star: unknown layout key \\(did you mean 'image_start'",
        ),
        ({"image_start": "<a> <b>"}, "data.template.layout.image_start: a marker is one control token"),
        ({"image_end": "<image>"}, "data.template.layout.image_end: a marker is one control token"),
        ({"name": "nope"}, "data.template.layout.name: unknown layout 'nope'"),
        (3, "data.template.layout: expected"),
    ],
)
def test_bad_layouts_are_config_errors_naming_the_key(layout, message):
    for name in ("vicuna_v1", "jamba", "hf"):
        with pytest.raises(ChimeraError, match=message):
            registry.validate("template", {"name": name, "layout": layout}, "data.template")


@pytest.mark.parametrize(
    "frames, message",
    [
        ([[1, 3]], "'frames' video 0 is \\[1, 3\\]; a video's frames are consecutive"),
        ([[2, 1]], "'frames' video 0 is \\[2, 1\\]; a video's frames are consecutive images in ascending"),
        ([[1, 2], [2, 3]], "'frames': image 2 belongs to two videos"),
        ([[3, 4]], "'frames' video 0 names images 3..4 but the conversation has 4 '<image>' placeholder"),
        (
            [[0, 1]],
            "'frames': image 1 is a frame of the same video as image 0 but text \\('what happens here \\?'\\)",
        ),
        ("0-3", "'frames' must be a list of lists of image indices"),
        ([[]], "'frames' must be a list of lists"),
        ([[1.0, 2.0]], "'frames' must be a list of lists"),
    ],
)
def test_bad_frames_name_the_sample(frames, message):
    tok = build_word_tokenizer(WORDS)
    with pytest.raises(ChimeraError, match=f"data.train sample 'v': {message}"):
        encode(video_sample(frames), tok, K, 512, where="data.train")


def test_a_video_spanning_two_turns_is_refused():
    conv = [human(f"{IMAGE} which ?"), gpt("red"), human(f"{IMAGE} and ?"), gpt("red")]
    with pytest.raises(
        ChimeraError, match="image 1 is a frame of the same video as image 0 but starts another"
    ):
        conversation_messages(conv, "t", frames=[[0, 1]])


# -- through the collator -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["longllava", "llava"])
def test_collated_video_has_its_markup_slots_and_answer_labels(layout):
    template = build_template({"name": "vicuna_v1", "layout": layout})
    tok = build_word_tokenizer(WORDS, template=template)
    batch = Collator(tok, K, 512, template=template)([video_sample()])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tokens = tok.convert_ids_to_tokens(ids)
    slots = [IMAGE] * K
    if layout == "longllava":
        img = ["<img>", *slots, "</img>"]
        expected_media = ["<vid>", *img, "<t>", *img, "<t>", *img, "</vid>"]
        first = img
    else:
        expected_media, first = slots * 3, slots
    assert tokens == [
        "<s>", "user", ":", *first, "what", "happens", "here", "?", *expected_media,
        "assistant", ":", "it", "fades", "</s>",
    ]  # fmt: skip
    assert [t for t, lab in zip(tokens, labels) if lab != IGNORE_INDEX] == ["it", "fades", "</s>"]
    assert batch["images"].shape[0] == 4


def test_custom_markers_are_tokens_and_may_not_be_typed():
    template = build_template(
        {"name": "chatml", "layout": {"image_start": "<im_start>", "image_end": "<im_end>"}}
    )
    assert template.markup == ("<|im_start|>", "<|im_end|>", "<im_start>", "<im_end>")
    tok = build_word_tokenizer(WORDS, template=template)
    ids = encode(video_sample(frames=()), tok, K, 512, template=template)["input_ids"].tolist()
    assert tok.convert_ids_to_tokens(ids).count("<im_start>") == 4
    typed = {"id": "x", "images": None, "conversations": [human("what <im_end> ?"), gpt("red")]}
    with pytest.raises(ChimeraError, match="sample 'x': turn 0: markup '<im_end>' typed into the text"):
        encode(typed, tok, K, 512, template=template)


def test_a_marker_the_tokenizer_does_not_know_fails_when_the_collator_is_built(tmp_path):
    build_word_tokenizer(WORDS).save_pretrained(tmp_path)  # a "pretrained" tokenizer without <im_start>
    tok = load_tokenizer(tmp_path)
    with pytest.raises(ChimeraError, match="data.template.layout: marker '<im_start>' is not one token"):
        Collator(tok, K, 512, template={"name": "vicuna_v1", "layout": {"image_start": "<im_start>"}})
    Collator(tok, K, 512, template={"name": "vicuna_v1", "layout": "llava"})  # no markers: fine


def test_a_template_without_frames_support_is_named():
    class Old:
        name, markup = "old", ()

        def words(self):
            return []

        def encode(self, conversations, tokenizer, where):
            return build_template().encode(conversations, tokenizer, where)

    tok = build_word_tokenizer(WORDS)
    assert encode(video_sample(frames=()), tok, K, 512, template=Old())["n_images"] == 4  # no frames: fine
    with pytest.raises(
        ChimeraError, match="sample 'v': the sample has 'frames' \\(videos\\) but template 'old'"
    ):
        encode(video_sample(), tok, K, 512, template=Old())
