"""``hf``: the tokenizer's own chat template, through transformers' ``apply_chat_template``.

Labels come from the template's ``{% generation %}`` blocks (``return_assistant_tokens_mask=True``,
transformers 5): the tokens overlapping a block are the targets. Official chat templates rarely carry these
blocks; add them around what the model must learn to write, usually the assistant content and its
end-of-turn token, e.g. for Llama-3::

    {%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}
    {%- endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}

A template without them would mask nothing, so it is refused; one whose blocks do not cover the answers is
reported per sample by the collator.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from toolkit.data.template import (
    DEFAULT_LAYOUT,
    Encoded,
    build_layout,
    conversation_messages,
    forbidden_markup,
    set_layout,
)
from toolkit.errors import ChimeraError
from toolkit.registry import register

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


@register("template", "hf")
class HFChatTemplate:
    """The tokenizer's own Jinja chat template (needs ``{% generation %}`` blocks around the answers).

    Args:
        chat_template: a Jinja template, or the path of a ``.jinja`` file, used instead of the tokenizer's.
        system: a system message put first in every conversation; None adds none (the template may still
            write its own default).
        layout: how images and videos are written into the messages before the chat template renders them
            (``longllava``, ``llava`` or a mapping of markers).
    """

    name = "hf"
    markup: tuple[str, ...] = ()

    def __init__(
        self,
        chat_template: str | None = None,
        system: str | None = None,
        layout: str | dict[str, str | None] | None = DEFAULT_LAYOUT,
    ):
        set_layout(self, layout)
        if chat_template is not None and chat_template.endswith(".jinja"):
            if not os.path.isfile(chat_template):
                raise ValueError(f"chat_template file '{chat_template}' does not exist")
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        self.chat_template = chat_template
        self.system = system or None

    def words(self) -> list[str]:
        return []  # unknown before a tokenizer (and its template) is at hand

    def jinja(self, tokenizer: Any) -> str:
        """The Jinja source in use, checked for ``{% generation %}`` blocks."""
        try:
            source = tokenizer.get_chat_template(self.chat_template)
        except ValueError as exc:
            raise ChimeraError(
                f"template 'hf': the tokenizer has no chat template ({exc}); set data.template.chat_template "
                "or choose a built-in template (vicuna_v1, llama3, chatml, jamba)",
                key="data.template",
            ) from exc
        if not _GENERATION.search(source):
            raise ChimeraError(
                "template 'hf': the chat template has no {% generation %} block, so no token would be trained on; "
                "wrap the assistant content (and its end-of-turn token) in {% generation %}...{% endgeneration %}",
                key="data.template",
            )
        return source

    @classmethod
    def validate_config(cls, kwargs: Mapping[str, Any], where: str) -> None:
        build_layout(kwargs.get("layout"), f"{where}.layout")

    def encode(
        self,
        conversations: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        where: str,
        frames: Sequence[Sequence[int]] | None = None,
    ) -> Encoded:
        from transformers.utils.chat_template_utils import render_jinja_template

        source = self.jinja(tokenizer)
        forbidden = forbidden_markup(self, tokenizer)
        messages = conversation_messages(conversations, where, forbidden, self.layout, frames)
        if self.system:
            messages = [{"role": "system", "content": self.system}, *messages]
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=source,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        # The text each {% generation %} block wrote, for the collator's check of the mask.
        rendered, spans = render_jinja_template(
            conversations=[messages],
            chat_template=source,
            return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
        targets = [rendered[0][start:end] for start, end in spans[0]]
        return Encoded(list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]], targets)

    def __repr__(self) -> str:
        return (
            f"HFChatTemplate(chat_template={'<custom>' if self.chat_template else None}, system={self.system!r}, "
            f"layout={self.layout!r})"
        )
