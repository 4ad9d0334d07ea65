"""``jamba``: LongLLaVA's prompt for its Jamba decoder (reference ``LongLLaVA/llava/conversation.py``,
``conv_jambaLabel``, and ``preprocess_jamba`` in ``llava/train/train.py``; arXiv 2409.02889).

::

    <|startoftext|><|User|>
    <img><image></img>
    what color is the shape ?
    <|startoftext|><|Assistant|>
    red<|endoftext|>

``<|startoftext|>`` / ``<|endoftext|>`` are the Jamba tokenizer's BOS / EOS, so they are written as the
tokenizer's own BOS / EOS. Targets are the answers and their EOS. LongLLaVA renders the model's input with a
newline instead of EOS after the answers of earlier turns while its labels hold EOS there; this template uses
the label rendering for both (input and labels agree, as a causal LM's shifted loss assumes). Jamba's
tokenizer carries no chat template; the Jinja twin used in the tests is::

    {% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '<|User|>\\n' + m['content'] + '\\n' }}
    {% else %}{{ bos_token + '<|Assistant|>\\n' }}{% generation %}{{ m['content'] + eos_token }}
    {% endgeneration %}{% endif %}{% endfor %}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from toolkit.data.template import DEFAULT_LAYOUT, ChatTemplate, Message
from toolkit.registry import register

USER = "<|User|>"
ASSISTANT = "<|Assistant|>"


@register("template", "jamba")
class Jamba(ChatTemplate):
    """LongLLaVA's Jamba prompt: ``<bos><|User|>\\nquestion\\n<bos><|Assistant|>\\nanswer<eos>``.

    Args:
        layout: how images and videos are written (``longllava``, LongLLaVA's own, ``llava`` or a mapping of
            markers).
    """

    name = "jamba"
    markup = (USER, ASSISTANT)

    def __init__(self, layout: str | dict[str, str | None] | None = DEFAULT_LAYOUT):
        super().__init__(layout)

    def segments(self, messages: Sequence[Message], tokenizer: Any) -> list[tuple[str, bool]]:
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
        segments: list[tuple[str, bool]] = []
        for message in messages:
            if message["role"] == "user":
                segments.append((f"{bos}{USER}\n{message['content']}\n", False))
            else:
                segments += [(f"{bos}{ASSISTANT}\n", False), (message["content"] + eos, True)]
        return segments
