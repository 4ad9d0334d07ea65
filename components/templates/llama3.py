"""``llama3``: the Llama-3 Instruct chat format (reference: Meta-Llama-3-8B-Instruct's ``tokenizer_config.json``).

::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>

    <img><image></img>
    what color is the shape ?<|eot_id|><|start_header_id|>assistant<|end_header_id|>

    red<|eot_id|>

Every message is trimmed of surrounding whitespace, as Meta's template does (``message['content'] | trim``).
Targets are the answers and their ``<|eot_id|>``; the headers are context. BOS is the tokenizer's own
(``<|begin_of_text|>`` for a Llama-3 tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from toolkit.data.template import DEFAULT_LAYOUT, ChatTemplate, Message
from toolkit.registry import register

START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"


def _header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


@register("template", "llama3")
class Llama3(ChatTemplate):
    """Llama-3 Instruct: ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` per message.

    Args:
        system: a system message written first; None writes none (Meta's template without a system turn).
        layout: how images and videos are written (``longllava``, ``llava`` or a mapping of markers).
    """

    name = "llama3"
    markup = (START_HEADER, END_HEADER, EOT)

    def __init__(
        self, system: str | None = None, layout: str | dict[str, str | None] | None = DEFAULT_LAYOUT
    ):
        super().__init__(layout)
        self.system = system or None

    def words(self) -> list[str]:
        return ["system", "user", "assistant", *(self.system.split() if self.system else [])]

    def segments(self, messages: Sequence[Message], tokenizer: Any) -> list[tuple[str, bool]]:
        segments: list[tuple[str, bool]] = [(tokenizer.bos_token or "", False)]
        if self.system:
            segments.append((_header("system") + self.system.strip() + EOT, False))
        for message in messages:
            content = message["content"].strip()
            if message["role"] == "user":
                segments.append((_header("user") + content + EOT, False))
            else:
                segments += [(_header("assistant"), False), (content + EOT, True)]
        return segments
