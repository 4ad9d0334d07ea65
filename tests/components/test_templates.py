"""Prompt templates: each built-in against transformers' rendering of the same conversation, and ``hf``.

Every built-in template has a Jinja twin below: the model family's official chat template (Llama-3 Instruct,
Qwen2 Instruct) or the reference rendering written as one (LLaVA's Vicuna v1, LongLLaVA's Jamba prompt), with
``{% generation %}`` blocks around what the model learns to write. A tokenizer fixture carries it, and
``apply_chat_template(..., return_assistant_tokens_mask=True)`` must give the same ids and the same assistant
mask as the template, on the offline word-level tokenizer and on a byte-level BPE (which keeps every space and
newline, so a rendering that differs by one character fails). Nothing is downloaded: the BPE is trained here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from toolkit import registry
from toolkit.data.collate import IGNORE_INDEX, Collator, encode
from toolkit.data.markup import IMAGE
from toolkit.data.template import build_template
from toolkit.data.tokenizer import build_word_tokenizer, load_tokenizer
from toolkit.errors import ChimeraError

# -- the Jinja twins ----------------------------------------------------------------------------------------

# LLaVA conv_vicuna_v1 (system + ' ' + 'USER: q ASSISTANT: a</s>' per turn), as a chat template.
VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system = messages[0]['content'] + ' ' %}{% else %}{% set loop_messages = messages %}"
    "{% set system = '' %}{% endif %}{{ bos_token + system }}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ASSISTANT:' }}"
    "{% else %}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
)
# Meta-Llama-3-8B-Instruct's template, the assistant content and its <|eot_id|> in a generation block.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Qwen2-7B-Instruct's template (default system turn), the assistant content and <|im_end|> generated.
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# LongLLaVA conv_jambaLabel ('<|startoftext|><|User|>\nq\n<|startoftext|><|Assistant|>\na<|endoftext|>').
JAMBA = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '<|User|>\\n' + message['content'] + '\\n' }}"
    "{% else %}{{ bos_token + '<|Assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{% endif %}{% endfor %}"
)
JINJA = {"vicuna_v1": VICUNA, "llama3": LLAMA3, "chatml": QWEN2, "jamba": JAMBA}

# The model family's special tokens, for the BPE fixture: (specials, bos, eos, pad).
FAMILY = {
    "vicuna_v1": (["<unk>", "<s>", "</s>"], "<s>", "</s>", None),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        None,
    ),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>"),
    "jamba": (
        ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>"],
        "<|startoftext|>",
        "<|endoftext|>",
        "<|pad|>",
    ),
}

SYSTEM = "You answer with one word."
# (template, its arguments, the system message transformers receives)
VARIANTS = [
    ("vicuna_v1", {}, None),
    ("vicuna_v1", {"system": SYSTEM}, SYSTEM),
    ("llama3", {}, None),
    ("llama3", {"system": SYSTEM}, SYSTEM),
    ("chatml", {}, None),
    ("chatml", {"system": SYSTEM}, SYSTEM),
    ("jamba", {}, None),
]


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


CONVERSATIONS = {
    "one image": [human(f"{IMAGE}\nwhat color is the shape ?"), gpt("red")],
    "multi-turn": [
        human(f"{IMAGE} {IMAGE}\nwhich image shows a circle ?"),
        gpt("the second"),
        human("  and which one is red ?\n"),
        gpt(" the first one \n"),
        human("describe the image ."),
        gpt("a red circle and a blue square"),
    ],
}
WORDS = sorted({w for c in CONVERSATIONS.values() for t in c for w in t["value"].split() if w != IMAGE})


def hf_messages(conversations, system=None):
    """The same conversation as transformers' chat messages (the image markup is Chimera's, in the text)."""
    roles = {"human": "user", "gpt": "assistant"}
    out = [{"role": "system", "content": system}] if system else []
    for turn in conversations:
        content = turn["value"].replace(IMAGE, f"<img>{IMAGE}</img>")
        out.append({"role": roles[turn["from"]], "content": content})
    return out


# -- tokenizer fixtures -------------------------------------------------------------------------------------


def word_level(name, kwargs):
    template = build_template({"name": name, **kwargs})
    tok = build_word_tokenizer(WORDS, template=template)
    tok.chat_template = JINJA[name]
    return tok


_BPE_CACHE: dict[str, PreTrainedTokenizerFast] = {}


def bpe(name, tmp_path_factory):
    """A byte-level BPE with the family's special tokens, trained on the rendered conversations, saved and
    loaded back through ``load_tokenizer`` (which adds the image markup)."""
    if name not in _BPE_CACHE:
        specials, bos, eos, pad = FAMILY[name]
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        corpus = [JINJA[name], SYSTEM] + [t["value"] for c in CONVERSATIONS.values() for t in c] * 3
        backend.train_from_iterator(corpus, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad)
        path = tmp_path_factory.mktemp(f"bpe_{name}")
        fast.save_pretrained(path)
        tok = load_tokenizer(path)
        tok.chat_template = JINJA[name]
        _BPE_CACHE[name] = tok
    return _BPE_CACHE[name]


@pytest.fixture(params=["word-level", "bpe"])
def make_tokenizer(request, tmp_path_factory):
    return lambda name, kwargs: (
        word_level(name, kwargs) if request.param == "word-level" else bpe(name, tmp_path_factory)
    )


# -- parity with transformers -------------------------------------------------------------------------------


def test_every_builtin_template_has_a_parity_test():
    builtins = {e.name for e in registry.entries("template") if e.module.startswith("components.templates")}
    assert builtins == {*JINJA, "hf"}


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name, kwargs, system", VARIANTS)
def test_builtin_matches_transformers_chat_template(make_tokenizer, name, kwargs, system, conversation):
    tok = make_tokenizer(name, kwargs)
    conv = CONVERSATIONS[conversation]
    template = build_template({"name": name, **kwargs})
    ours = template.encode(conv, tok, "test")
    messages = hf_messages(conv, system)
    text = tok.apply_chat_template(messages, tokenize=False)
    assert "".join(t for t, _ in template.segments(messages[1 if system else 0 :], tok)) == text
    ref = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ours.ids == list(ref["input_ids"])
    assert [int(m) for m in ours.mask] == list(ref["assistant_masks"])
    assert sum(ours.mask) > 0 and tok.unk_token_id not in ours.ids
    # the hf template, reading the tokenizer's own chat template, gives the same
    via_hf = build_template({"name": "hf", "system": system}).encode(conv, tok, "test")
    assert (via_hf.ids, via_hf.mask, via_hf.targets) == (ours.ids, ours.mask, ours.targets)


VIDEO_CONV = [human(f"{IMAGE} {IMAGE} {IMAGE}\nwhich image shows a circle ?"), gpt("the second")]
# the same user turn as the layouts write it, spelled out: LongLLaVA's cli.py, and LLaVA(-NeXT-Video)'s
VIDEO_TEXT = {
    "longllava": "<vid><img><image></img><t><img><image></img><t><img><image></img></vid>\nwhich image shows a circle ?",
    "llava": "<image><image><image>\nwhich image shows a circle ?",
}


@pytest.mark.parametrize("layout", list(VIDEO_TEXT))
@pytest.mark.parametrize("name, kwargs, system", VARIANTS)
def test_builtin_writes_a_video_as_transformers_renders_its_markup(
    make_tokenizer, name, kwargs, system, layout
):
    tok = make_tokenizer(name, kwargs)
    template = build_template({"name": name, "layout": layout, **kwargs})
    ours = template.encode(VIDEO_CONV, tok, "test", frames=[[0, 1, 2]])
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": VIDEO_TEXT[layout]},
        {"role": "assistant", "content": "the second"},
    ]
    ref = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ours.ids == list(ref["input_ids"])
    assert [int(m) for m in ours.mask] == list(ref["assistant_masks"])
    via_hf = build_template({"name": "hf", "system": system, "layout": layout})
    assert via_hf.encode(VIDEO_CONV, tok, "test", frames=[[0, 1, 2]]).ids == ours.ids


def test_collated_labels_are_the_answers_and_end_of_turn(make_tokenizer):
    import torch

    conv = CONVERSATIONS["multi-turn"]
    sample = {"id": "mt", "images": torch.zeros(2, 3, 4, 4), "conversations": conv}
    answers = [" ".join(t["value"].lower().split()) for t in conv if t["from"] == "gpt"]
    for name, end in (
        ("vicuna_v1", None),
        ("llama3", "<|eot_id|>"),
        ("chatml", "<|im_end|>"),
        ("jamba", None),
    ):
        tok = make_tokenizer(name, {})
        end = end or tok.eos_token
        batch = Collator(tok, image_tokens=3, max_length=4096, template=name)([sample])
        labels = batch["labels"][0]
        assert int((batch["input_ids"][0] == tok.convert_tokens_to_ids(IMAGE)).sum()) == 2 * 3
        targets = tok.decode(labels[labels != IGNORE_INDEX].tolist())
        assert targets.count(end) == 3 and targets.rstrip().endswith(end), (name, targets)
        assert [" ".join(p.lower().split()) for p in targets.split(end)[:-1]] == answers, (name, targets)


# -- exact renderings ---------------------------------------------------------------------------------------


def test_vicuna_v1_renders_todays_prompt_exactly():
    tok = SimpleNamespace(bos_token="<s>", eos_token="</s>")
    messages = [{"role": "user", "content": "<img><image></img>\nwhat color is the shape ?"}]
    messages.append({"role": "assistant", "content": "red"})
    assert build_template("vicuna_v1").segments(messages, tok) == [
        ("<s>", False),
        ("USER: <img><image></img>\nwhat color is the shape ? ASSISTANT:", False),
        (" red</s>", True),
    ]


def test_vicuna_v1_two_turns_targets_only_answers():
    tok = SimpleNamespace(bos_token=None, eos_token="[E]")
    roles = ["user", "assistant", "user", "assistant"]
    messages = [{"role": r, "content": c} for r, c in zip(roles, ["a ?", "b", "c ?", "d"])]
    segments = build_template("vicuna_v1").segments(messages, tok)
    assert "".join(t for t, _ in segments) == "USER: a ? ASSISTANT: b[E]USER: c ? ASSISTANT: d[E]"
    assert [t for t, target in segments if target] == [" b[E]", " d[E]"]


def test_chatml_without_system_and_words():
    tok = SimpleNamespace(bos_token=None, eos_token="<|im_end|>")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    text = "".join(t for t, _ in build_template({"name": "chatml", "system": None}).segments(messages, tok))
    assert text == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    words = build_template("chatml").words()
    assert words[:3] == ["system", "user", "assistant"] and "helpful" in words
    assert build_template("jamba").markup == ("<|User|>", "<|Assistant|>")


# -- hf -----------------------------------------------------------------------------------------------------


def test_hf_refuses_a_tokenizer_without_chat_template_or_generation_blocks():
    tok = build_word_tokenizer(WORDS)
    with pytest.raises(ChimeraError, match="template 'hf': the tokenizer has no chat template"):
        Collator(tok, 3, 512, template="hf")
    tok.chat_template = LLAMA3.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ChimeraError, match="has no \\{% generation %\\} block"):
        Collator(tok, 3, 512, template="hf")


def test_hf_reads_a_jinja_file_and_checks_where_its_blocks_are(tmp_path):
    tok = build_word_tokenizer(WORDS, template="llama3")
    path = tmp_path / "llama3.jinja"
    path.write_text(LLAMA3)
    sample = {"id": "f", "images": None, "conversations": [human("what color is the shape ?"), gpt("red")]}
    from_file = encode(sample, tok, 3, 512, template={"name": "hf", "chat_template": str(path)})
    assert (
        from_file["input_ids"].tolist()
        == encode(sample, tok, 3, 512, template="llama3")["input_ids"].tolist()
    )
    # generation around the header and the answer: the collator names the sample and the extra text
    wide = LLAMA3.replace(
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}",
        "{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}",
    )
    assert wide != LLAMA3
    with pytest.raises(
        ChimeraError, match="sample 'f': template 'hf': target span 0 .* holds 'assistant' besides"
    ):
        encode(sample, tok, 3, 512, template={"name": "hf", "chat_template": wide})
    with pytest.raises(
        ChimeraError, match="data.template: template 'hf' rejected its arguments.*does not exist"
    ):
        build_template({"name": "hf", "chat_template": str(tmp_path / "missing.jinja")})
