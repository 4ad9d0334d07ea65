"""Template machinery: conversation checks, segments -> ids + assistant mask, building templates, no cycles."""

from __future__ import annotations

import ast
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT
from toolkit.data.markup import IMAGE
from toolkit.data.template import ChatTemplate, build_template, conversation_messages, encode_segments
from toolkit.data.tokenizer import build_word_tokenizer
from toolkit.errors import ChimeraError

WORDS = ["what", "color", "is", "the", "shape", "?", "red", "a", "b", "c", "d"]


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


def test_messages_wrap_images_and_map_roles():
    messages = conversation_messages([human(f"{IMAGE}\nwhat ?"), gpt("red"), human("b"), gpt("c")], "x")
    assert messages == [
        {"role": "user", "content": "<img><image></img>\nwhat ?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]


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
        ([human("a </img>"), gpt("b")], "turn 0: markup '</img>' typed into the text of a 'human' turn"),
        (
            [human("a"), gpt("b <|im_end|>")],
            "turn 1: markup '<|im_end|>' typed into the text of a 'gpt' turn",
        ),
    ],
)
def test_malformed_conversations_name_the_sample_and_turn(conversations, expected):
    with pytest.raises(ChimeraError) as info:
        conversation_messages(conversations, "data.train sample 'abc'", forbidden=("<|im_end|>", "</img>"))
    assert str(info.value).startswith("data.train sample 'abc': ")
    assert expected in str(info.value)


def test_segments_are_tokenized_once_with_overlap_masks(tok):
    encoded = encode_segments(
        [("<s>", False), ("what color ? ", False), (" red</s>", True), ("a", False)], tok
    )
    assert tok.convert_ids_to_tokens(encoded.ids) == ["<s>", "what", "color", "?", "red", "</s>", "a"]
    assert encoded.mask == [False, False, False, False, True, True, False]
    assert encoded.targets == [" red</s>"]
    # a token straddling the boundary ("re" + "d" -> "red") is a target, as in transformers
    straddle = encode_segments([("what re", False), ("d", True)], tok)
    assert straddle.mask == [False, True] and straddle.targets == ["d"]


def test_build_template_from_names_nodes_and_objects():
    from omegaconf import OmegaConf

    assert build_template().name == build_template("vicuna_v1").name == "vicuna_v1"
    built = build_template(
        OmegaConf.create({"name": "vicuna_v1", "system": "hi ."}), "stages[1].data.template"
    )
    assert built.system == "hi ." and build_template(built) is built
    custom = SimpleNamespace(encode=lambda conversations, tokenizer, where: None)
    assert build_template(custom) is custom
    with pytest.raises(ChimeraError, match="stages\\[0\\].data.template.name: unknown template"):
        build_template({"name": "nope"}, "stages[0].data.template")
    with pytest.raises(ChimeraError, match="data.template: expected a template name"):
        build_template(3)
    assert isinstance(built, ChatTemplate) and "system='hi .'" in repr(built)


def _imports(path) -> set[str]:
    """toolkit.data modules imported anywhere in ``path`` (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("toolkit.data."):
            found.add(node.module.removeprefix("toolkit.data."))
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("toolkit.data.") for a in node.names if a.name.startswith("toolkit.data.")
            }
    return found


def test_data_modules_import_each_other_without_cycles():
    folder = ROOT / "toolkit" / "data"
    graph = {p.stem: _imports(p) for p in folder.glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(module, path):
        assert state.get(module) != 1, f"import cycle: {' -> '.join([*path, module])}"
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in graph.get(module, ()):
            visit(dep, [*path, module])
        state[module] = 2

    for module in graph:
        visit(module, [])
    assert "tokenizer" not in graph["template"] and graph["markup"] == set()
