"""A Chimera run as an lmms-eval model (lmms-eval 0.7.x's ``lmms`` interface; nanoVLM's
``eval/lmms_eval_wrapper.py`` is the public example it follows).

``Chimera(run=runs/NAME)`` rebuilds the model from the run's ``config.yaml`` and final weights
(``toolkit.generate.load_for_generation``; ``config=EXPERIMENT.yaml`` builds an experiment as configured) and
answers lmms-eval's requests. Each request's ``args`` is what lmms-eval 0.7 builds for a "simple" model:

- ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``. The context becomes the
  human turn of the experiment's prompt template (one ``<image>`` line per image before it, unless it writes
  ``<image>`` itself), the assistant's prefix follows, and the answer is generated in batches of left-padded
  prompts (``toolkit.generate``): greedy unless ``do_sample`` with a ``temperature`` above 0, up to
  ``max_new_tokens``, stopping at the template's end of turn; the text is cut at the first ``until`` string.
- ``loglikelihood``: ``(context, continuation, doc_to_visual, doc_id, task, split)`` -> (sum of the
  continuation tokens' log-probabilities after the rendered prompt, whether greedy decoding would produce them).

Images are what ``doc_to_visual(doc)`` returns (Pillow images, paths or arrays), preprocessed as the run's
training data is (``toolkit.generate.prepare_images``: its preprocessing, AnyRes grids and token counts). Video
and audio inputs are refused with a message.
Without lmms-eval installed the class has the same interface on a plain base (tests call it directly).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from toolkit.errors import ChimeraError

logger = logging.getLogger("chimera")

try:  # lmms-eval is optional (the ``eval`` extra)
    from lmms_eval.api.model import lmms as _Base
except ImportError:

    class _Base:  # type: ignore[no-redef]
        """``lmms_eval.api.model.lmms``'s attributes, for use without lmms-eval."""

        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1
            self.task_dict: dict[str, Any] = {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


class Chimera(_Base):
    """lmms-eval model ``chimera``: ``--model_args run=runs/NAME[,max_new_tokens=128,dtype=bfloat16]``.

    Args:
        run: a run folder (runs/NAME). config: an experiment file instead (the model as it builds).
        device: ``cuda``, ``cuda:1``, ``cpu`` (default: CUDA when available).
        batch_size: prompts generated together (lmms-eval's ``--batch_size``; ``auto`` means 8).
        max_new_tokens: when a task's ``gen_kwargs`` does not say.
        dtype: e.g. ``bfloat16`` (default: the weights' own).
    """

    is_simple = True

    def __init__(
        self,
        run: str | None = None,
        config: str | None = None,
        device: str | None = None,
        batch_size: int | str = 8,
        max_new_tokens: int = 128,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from toolkit.generate import end_of_turn_ids, load_for_generation, template_of

        target = run or config
        if not target:
            raise ChimeraError(
                "lmms-eval model chimera: pass --model_args run=runs/NAME (or config=EXPERIMENT.yaml)"
            )
        if kwargs:
            logger.warning("lmms-eval model chimera: ignoring model args %s", sorted(kwargs))
        model, tokenizer, cfg = load_for_generation(target)
        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        model.to(self._device)
        if dtype:
            model.to(getattr(torch, str(dtype)))
        self.model, self.tokenizer, self.target, self.cfg = model, tokenizer, str(target), cfg
        self.template = template_of(cfg)
        self.stops = end_of_turn_ids(self.template, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.stops[0] if self.stops else 0))
        self.batch_size = 8 if str(batch_size).startswith("auto") else max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------------------ inputs
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Any]:
        """``doc_to_visual(doc)`` flattened to Pillow images."""
        if doc_to_visual is None:
            return []
        import numpy as np
        from PIL import Image

        found = doc_to_visual(self._doc(task, split, doc_id))
        items = list(found) if isinstance(found, (list, tuple)) else [found]
        images = []
        for item in items:
            if item is None:
                continue
            if isinstance(item, (list, tuple)):
                items.extend(item)
            elif isinstance(item, Image.Image):
                images.append(item)
            elif isinstance(item, np.ndarray):
                images.append(Image.fromarray(item))
            elif isinstance(item, str) and not item.lower().endswith(
                (".mp4", ".avi", ".mov", ".mkv", ".webm")
            ):
                images.append(Image.open(item))
            else:
                raise ChimeraError(
                    f"lmms-eval task {task}: visual input {type(item).__name__} {str(item)[:60]!r} is not an image; "
                    "the chimera model takes images (Pillow, paths, arrays)"
                )
        return images

    def _prompt(self, context: str, image_tokens: Sequence[int]) -> list[int]:
        """The context as the template's human turn (``<image>`` lines first unless it places them), each image
        expanded to its token count."""
        from toolkit.data.markup import IMAGE
        from toolkit.data.tokenizer import image_token_id
        from toolkit.generate import expand_images, render_prompt

        n_images = len(image_tokens)
        text = context if IMAGE in context or n_images == 0 else f"{IMAGE}\n" * n_images + context
        ids = render_prompt(self.template, self.tokenizer, text, "lmms-eval context")
        return expand_images(ids, image_token_id(self.tokenizer), iter(image_tokens))

    def _vision(self, images: Sequence[Any]) -> tuple[Tensor | None, Tensor | None, list[int]]:
        """(views on the device, image_layout, tokens per image), as the run's training data builds them."""
        from toolkit.generate import prepare_images

        views, layout, tokens = prepare_images(self.model, self.cfg, images)
        return (None if views is None else views.to(self._device)), layout, tokens

    # ------------------------------------------------------------------------------------------ requests
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """One answer per request, batched by identical ``gen_kwargs``, longest prompts first."""
        from toolkit.generate import generate

        items = []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
            images = self._visuals(doc_to_visual, task, split, doc_id)
            items.append((i, context, images, dict(gen_kwargs or {})))
        groups: dict[str, list[Any]] = {}
        for item in items:
            groups.setdefault(json.dumps(item[3], sort_keys=True, default=str), []).append(item)
        answers: list[str] = [""] * len(items)
        for group in groups.values():
            group.sort(key=lambda item: -len(item[1]))  # longest contexts first: batches of similar lengths
            kwargs = group[0][3]
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature") or 0) > 0
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                views, layout, tokens = self._vision([image for item in batch for image in item[2]])
                counts, prompts = iter(tokens), []
                for item in batch:  # each prompt takes its own images' token counts, in order
                    prompts.append(self._prompt(item[1], [next(counts) for _ in item[2]]))
                result = generate(
                    self.model,
                    prompts,
                    views,
                    max_new_tokens=int(kwargs.get("max_new_tokens") or self.max_new_tokens),
                    eos_token_id=self.stops,
                    pad_token_id=self.pad_id,
                    temperature=float(kwargs.get("temperature") or 0) if sample else 0.0,
                    top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                    seed=kwargs.get("seed"),
                    image_layout=layout,
                )
                for item, tokens in zip(batch, result.tokens):
                    text = self.tokenizer.decode(
                        [t for t in tokens if t not in self.stops], skip_special_tokens=True
                    )
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    answers[item[0]] = text
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log P(continuation | rendered context and images), greedy decoding would produce it) per request."""
        out = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args[:6]
            if not isinstance(continuation, str):  # lmms-eval may pass doc_to_target
                continuation = continuation(self._doc(task, split, doc_id))
            views, layout, tokens = self._vision(self._visuals(doc_to_visual, task, split, doc_id))
            prompt = self._prompt(context, tokens)
            target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not target:
                out.append((0.0, True))
                continue
            ids = torch.tensor([prompt + target], device=self._device)
            logits = self.model(ids, views, image_layout=layout)[
                0, len(prompt) - 1 : -1
            ].float()  # [n, vocab]
            logprobs = torch.log_softmax(logits, dim=-1)
            want = torch.tensor(target, device=self._device)
            total = float(logprobs.gather(1, want[:, None]).sum())
            out.append((total, bool((logprobs.argmax(-1) == want).all())))
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("lmms-eval model chimera: multi-round generation is not supported")
