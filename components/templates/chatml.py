"""``chatml``: the ChatML format of Qwen2 (reference: Qwen2-7B-Instruct's ``tokenizer_config.json``).

::

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    <img><image></img>
    what color is the shape ?<|im_end|>
    <|im_start|>assistant
    red<|im_end|>

Qwen2's template writes the system message "You are a helpful assistant." when a conversation has none; so
does this one (``system``). Contents are written as they are (no trimming). Targets are the answers and their
``<|im_end|>``; the newline after ``<|im_end|>`` and the headers are context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from toolkit.data.template import DEFAULT_LAYOUT, ChatTemplate, Message
from toolkit.registry import register

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
QWEN2_SYSTEM = "You are a helpful assistant."


@register("template", "chatml")
class ChatML(ChatTemplate):
    """ChatML (Qwen2): ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, Qwen2's default system turn.

    Args:
        system: the system message; None writes no system turn (Qwen2's own template always writes one).
        layout: how images and videos are written (``longllava``, ``llava`` or a mapping of markers).
    """

    name = "chatml"
    markup = (IM_START, IM_END)

    def __init__(
        self, system: str | None = QWEN2_SYSTEM, layout: str | dict[str, str | None] | None = DEFAULT_LAYOUT
    ):
        super().__init__(layout)
        self.system = system or None

    def words(self) -> list[str]:
        return ["system", "user", "assistant", *(self.system.split() if self.system else [])]

    def segments(self, messages: Sequence[Message], tokenizer: Any) -> list[tuple[str, bool]]:
        segments: list[tuple[str, bool]] = []
        if self.system:
            segments.append((f"{IM_START}system\n{self.system}{IM_END}\n", False))
        for message in messages:
            if message["role"] == "user":
                segments.append((f"{IM_START}user\n{message['content']}{IM_END}\n", False))
            else:
                segments += [
                    (f"{IM_START}assistant\n", False),
                    (message["content"] + IM_END, True),
                    ("\n", False),
                ]
        return segments
