"""The prompt template: LLaVA conversations -> text segments marked as prompt or training target.

Samples use the LLaVA conversation format (``[{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]``),
rendered in the Vicuna-v1 style LLaVA uses, with LongLLaVA's image markup (arXiv 2409.02889; reference
``LLaVA/llava/conversation.py``, ``conv_vicuna_v1``)::

    <s>USER: <img><image></img>
    what color is the shape ? ASSISTANT: red</s>USER: ... ASSISTANT: ...</s>

Only the assistant answers and their ``</s>`` are targets; BOS, the ``USER:`` prompts, the questions and the
image markup are context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from toolkit.data.tokenizer import BOS, EOS, IMAGE, IMG_END, IMG_START
from toolkit.errors import ChimeraError

HUMAN = "human"
GPT = "gpt"
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = " ASSISTANT:"


def template_words() -> list[str]:
    """Words the template itself writes (added to every word-level vocabulary)."""
    return ["USER", ":", "ASSISTANT"]


def render(
    conversations: Sequence[Mapping[str, Any]], where: str, *, bos: str | None = BOS, eos: str = EOS
) -> list[tuple[str, bool]]:
    """Render a conversation as ``[(text, is_target), ...]`` segments whose concatenation is the prompt.

    Args:
        conversations: alternating ``{"from": "human"|"gpt", "value": str}`` turns, starting with human and
            ending with gpt. ``<image>`` placeholders may appear in human turns only.
        where: names the sample in errors, e.g. ``"data.train sample 'abc'"``.
        bos, eos: the tokenizer's BOS / EOS text (a tokenizer without BOS passes ``None`` or ``""``).

    Returns:
        ``[(bos, False), ("USER: <img><image></img>\\n... ASSISTANT:", False), (" red</s>", True), ...]``
    """
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise ChimeraError(
            f"{where}: 'conversations' must be a list of turns, got {type(conversations).__name__}"
        )
    if len(conversations) == 0:
        raise ChimeraError(f"{where}: 'conversations' is empty; expected alternating human/gpt turns")
    segments: list[tuple[str, bool]] = [(bos, False)] if bos else []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ChimeraError(
                f"{where}: turn {i}: expected a mapping with 'from' and 'value', got {turn!r:.80}"
            )
        speaker, value = turn["from"], turn["value"]
        if speaker not in (HUMAN, GPT):
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
        if speaker == HUMAN:
            text = value.replace(IMAGE, IMG_START + IMAGE + IMG_END)
            segments.append((USER_PREFIX + text + ASSISTANT_PREFIX, False))
        else:
            if IMAGE in value:
                raise ChimeraError(
                    f"{where}: turn {i}: '{IMAGE}' in a 'gpt' turn; images belong in 'human' turns"
                )
            segments.append((" " + value + eos, True))
    if len(conversations) % 2 == 1:
        raise ChimeraError(
            f"{where}: turn {len(conversations) - 1}: the conversation ends with a 'human' turn; "
            "expected a 'gpt' answer after it"
        )
    return segments
