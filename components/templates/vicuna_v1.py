"""``vicuna_v1``: the Vicuna v1 prompt of LLaVA-1.5 (reference ``LLaVA/llava/conversation.py``, ``conv_vicuna_v1``).

With LongLLaVA's image markup (arXiv 2409.02889), a two-turn sample renders as::

    <s>USER: <img><image></img>
    what color is the shape ? ASSISTANT: red</s>USER: ... ASSISTANT: ...</s>

Targets are the answers with their leading space and ``</s>``; BOS, the ``USER:`` prompts, the questions and
the image markup are context. LLaVA-1.5 also writes a system prompt before the first ``USER:`` ("A chat
between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and
polite answers to the user's questions."); it is off by default (``system: null``), as in Chimera's
synthetic runs, and set with ``data.template.system``.

The same rendering as a Jinja chat template (tested against transformers' ``apply_chat_template``)::

    {{ bos_token }}{% if system %}{{ system + ' ' }}{% endif %}{% for m in messages %}
    {% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ASSISTANT:' }}
    {% else %}{% generation %}{{ ' ' + m['content'] + eos_token }}{% endgeneration %}{% endif %}{% endfor %}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from toolkit.data.template import DEFAULT_LAYOUT, ChatTemplate, Message
from toolkit.registry import register

USER_PREFIX = "USER: "
ASSISTANT_PREFIX = " ASSISTANT:"


@register("template", "vicuna_v1")
class VicunaV1(ChatTemplate):
    """LLaVA-1.5's Vicuna v1 prompt: ``<s>USER: question ASSISTANT: answer</s>`` (the default).

    Args:
        system: text written before the first ``USER:`` (followed by a space); None writes none.
        layout: how images and videos are written: ``longllava`` (``<img><image></img>``), ``llava`` (the
            bare ``<image>``) or a mapping of markers (``toolkit.data.template.Layout``).
    """

    name = "vicuna_v1"

    def __init__(
        self, system: str | None = None, layout: str | dict[str, str | None] | None = DEFAULT_LAYOUT
    ):
        super().__init__(layout)
        self.system = system or None

    def words(self) -> list[str]:
        return ["USER", ":", "ASSISTANT", *(self.system.split() if self.system else [])]

    def segments(self, messages: Sequence[Message], tokenizer: Any) -> list[tuple[str, bool]]:
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
        segments: list[tuple[str, bool]] = [(bos, False)] if bos else []
        system = self.system + " " if self.system else ""
        for message in messages:
            if message["role"] == "user":
                segments.append((system + USER_PREFIX + message["content"] + ASSISTANT_PREFIX, False))
                system = ""
            else:
                segments.append((" " + message["content"] + eos, True))
        return segments
