"""Generation: batched prompts of different lengths, greedy or sampled decoding, streaming, ``chimera generate``.

One prefill over the (left-padded) prompts fills the decoder's cache, then one token per step::

    prompts ─ left pad ─ embed (+ images at <image> slots) ─ prefill ─┬─ logits ─ next token ─┬─ yield ─►
                                                                      └───── cache ◄── embed ─┘

Left padding changes nothing a row computes (``HybridDecoder.allocate_cache(pad=...)``): attention masks the
padded keys and counts RoPE positions from each row's first real token; the Mamba mixers zero the padded
positions' conv inputs and time steps, so their states stay exactly zero through them. A batch therefore
generates what each prompt would alone (tests/toolkit/test_generate.py checks it token for token).

Decoding: ``temperature`` 0 is greedy (argmax); above 0 the logits are divided by it and sampled, keeping the
smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al., 2019) and
drawing from a ``torch.Generator`` seeded with ``seed`` (same seed, same tokens). A row stops at its stop
token (the tokenizer's EOS and the template's end of turn) and is padded from there; generation ends when
every row has stopped or after ``max_new_tokens``.

Streaming: ``stream`` yields each step's tokens as they come; ``MultimodalModel.generate(streamer=...)`` calls
a function with them. ``generate_command`` is ``chimera generate``: a run folder (its ``config.yaml`` and final
weights) or an experiment file, prompts written with the experiment's template (the human turn and the
assistant's prefix), images preprocessed as the experiment's training data is (``prepare_images``: the
encoder's preprocessing, AnyRes grids and token counts of ``toolkit.data.vision``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from toolkit.errors import ChimeraError

if TYPE_CHECKING:
    from toolkit.model import MultimodalModel

Prompts = Tensor | Sequence[Sequence[int]]


@dataclass
class Step:
    """One decoding step: the token each row chose ([B]) and the logits it chose from ([B, vocab])."""

    tokens: Tensor
    logits: Tensor


@dataclass
class Generation:
    """What ``generate`` returns.

    ``sequences``: [B, T + n], the prompts left-padded to the longest (T) with the pad id, then the n new
    tokens (the pad id after a row's stop token). ``tokens``: per row, the new tokens up to and including its
    stop token. ``logits``: [B, n, vocab] the logits of every step (``output_logits=True``), else None.
    """

    sequences: Tensor
    tokens: list[list[int]]
    prompt_lengths: list[int]
    logits: Tensor | None = None


# --------------------------------------------------------------------------------------------- core
def left_pad(prompts: Prompts, pad_token_id: int, device: Any = None) -> tuple[Tensor, Tensor]:
    """Prompts -> (ids [B, T] left-padded with ``pad_token_id``, pad [B]: padding positions per row).

    A [B, T] tensor is taken as B prompts of length T (no padding); a list of id sequences may differ in length.
    """
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            raise ChimeraError(f"generate: input_ids must be [batch, length>0], got {list(prompts.shape)}")
        ids = prompts.to(device) if device is not None else prompts
        return ids, torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    rows = [torch.as_tensor(list(p), dtype=torch.long) for p in prompts]
    if not rows or any(r.ndim != 1 or r.numel() == 0 for r in rows):
        raise ChimeraError("generate: every prompt needs at least one token")
    T = max(r.numel() for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - r.numel() :] = r
    pad = torch.tensor([T - r.numel() for r in rows], dtype=torch.long)
    return ids.to(device), pad.to(device)


def next_tokens(
    logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """[B, vocab] -> [B]: argmax at ``temperature`` 0, else a draw from softmax(logits / temperature) restricted
    to the nucleus (the most probable tokens whose cumulative probability first reaches ``top_p``)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before a token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_steps(
    decoder: nn.Module,
    embeds: Tensor,
    pad: Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    cache: list[Any] | None = None,
) -> Iterator[Step]:
    """The decoding loop of any registered decoder: prefill ``embeds`` [B, T, d_model] (row b left-padded by
    ``pad[b]`` positions), then yield one ``Step`` per new token. The first ``next()`` runs the prefill.

    ``cache``: one from ``decoder.allocate_cache(B, T + max_new_tokens, pad=pad)`` (allocated here when None).
    Rows that produced a stop token emit ``pad_token_id`` afterwards; the loop ends when all have stopped.
    """
    B, T, _ = embeds.shape
    if cache is None:
        cache = decoder.allocate_cache(B, T + max_new_tokens, device=embeds.device, pad=pad)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=embeds.device)
    done = torch.zeros(B, dtype=torch.bool, device=embeds.device)
    logits = decoder.logits(decoder(embeds, cache=cache)[:, -1])  # [B, vocab]: the last position only
    for i in range(max_new_tokens):
        tokens = next_tokens(logits, temperature, top_p, generator)
        if stops.numel():
            tokens = tokens.masked_fill(done, pad_token_id)
            done |= torch.isin(tokens, stops)
        yield Step(tokens, logits)
        if i + 1 == max_new_tokens or (stops.numel() and bool(done.all())):
            return
        logits = decoder.logits(decoder(decoder.embed(tokens[:, None]), cache=cache)[:, -1])


def _stop_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device).manual_seed(int(seed))


@torch.inference_mode()
def stream(
    model: MultimodalModel,
    input_ids: Prompts,
    images: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    image_layout: Tensor | None = None,
) -> Iterator[Step]:
    """Yield each step's tokens ([B]) and logits as they are generated (see ``generate`` for the arguments)."""
    if max_new_tokens < 1:
        raise ChimeraError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ChimeraError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = next(model.parameters()).device
    ids, pad = left_pad(input_ids, pad_token_id, device)
    if pad_token_id == model.image_token_id and bool((pad > 0).any()):
        raise ChimeraError("generate: pad_token_id is the image token; pad with another id")
    layout = None if image_layout is None else image_layout.to(device)
    embeds = model.embed(ids, None if images is None else images.to(device), layout)  # [B, T, D]
    generator = generator or _generator(seed, device)
    yield from decode_steps(
        model.decoder,
        embeds,
        pad,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
        stop_ids=_stop_ids(eos_token_id),
        pad_token_id=pad_token_id,
    )


def generate(
    model: MultimodalModel,
    input_ids: Prompts,
    images: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], Any] | None = None,
    output_logits: bool = False,
    image_layout: Tensor | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` tokens for each prompt.

    Args:
        input_ids: [B, T] (prompts of equal length) or a list of id sequences of any lengths (left-padded
            here). Each ``<image>`` is already expanded into ``model.image_tokens`` image-token ids.
        images: [V, 3, H, W] in [0, 1], the views of all prompts' images in placeholder order;
            ``image_layout`` [N, 6] their token-plan rows (``prepare_images``; None: one view per image of
            ``model.image_tokens`` tokens).
        eos_token_id: stop token(s); None generates ``max_new_tokens`` tokens.
        pad_token_id: left padding and what a stopped row emits (not the image token).
        temperature, top_p, seed / generator: decoding (see ``next_tokens``); ``seed`` makes sampling
            reproducible (a ``generator`` passed in is used as is).
        streamer: called with each step's tokens [B] as they come.
        output_logits: keep every step's logits (``Generation.logits``).
    """
    ids, pad = left_pad(input_ids, pad_token_id)
    steps, logits = [], []
    for step in stream(
        model,
        ids if isinstance(input_ids, Tensor) else input_ids,
        images,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        generator=generator,
        image_layout=image_layout,
    ):
        steps.append(step.tokens)
        if output_logits:
            logits.append(step.logits)
        if streamer is not None:
            streamer(step.tokens)
    new = torch.stack(steps, dim=1)  # [B, n]
    stops = set(_stop_ids(eos_token_id))
    tokens = []
    for row in new.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        tokens.append(row[:end])
    return Generation(
        sequences=torch.cat([ids.to(new.device), new], dim=1),
        tokens=tokens,
        prompt_lengths=(ids.shape[1] - pad).tolist(),
        logits=torch.stack(logits, dim=1) if output_logits else None,
    )


# --------------------------------------------------------------------------------------------- prompts
ANSWER_PROBE = "x"  # an assistant answer to render the template around; only where it starts matters


def render_prompt(template: Any, tokenizer: Any, text: str, where: str = "prompt") -> list[int]:
    """The template's rendering of a human turn ``text`` followed by the assistant's prefix, as token ids
    (each ``<image>`` still one id): the conversation ``[human: text, gpt: ...]`` encoded as for training and
    cut where the answer's target tokens start (e.g. vicuna_v1: ``<s>USER: ... ASSISTANT:``)."""
    conversation = [{"from": "human", "value": text}, {"from": "gpt", "value": ANSWER_PROBE}]
    encoded = template.encode(conversation, tokenizer, where)
    if True not in encoded.mask:
        raise ChimeraError(f"{where}: template marks no answer tokens; cannot tell where the answer starts")
    return list(encoded.ids[: encoded.mask.index(True)])


def end_of_turn_ids(template: Any, tokenizer: Any) -> list[int]:
    """Stop tokens: the tokenizer's EOS and the special token(s) closing the template's answers (``</s>``,
    ``<|im_end|>``, ``<|eot_id|>``, ...)."""
    conversation = [{"from": "human", "value": "?"}, {"from": "gpt", "value": ANSWER_PROBE}]
    encoded = template.encode(conversation, tokenizer, "stop tokens")
    special = set(getattr(tokenizer, "all_special_ids", []))
    target = [t for t, m in zip(encoded.ids, encoded.mask) if m]
    ids = [t for t in target if t in special]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return list(dict.fromkeys(ids))


def expand_images(ids: Sequence[int], image_id: int, image_tokens: int | Iterator[int]) -> list[int]:
    """Each image placeholder id -> its image's token count of copies (what the collator does for training):
    ``image_tokens`` for every image, or the next count of an iterator over the images in placeholder order."""
    out: list[int] = []
    for t in ids:
        if t != image_id:
            out.append(t)
            continue
        n = image_tokens if isinstance(image_tokens, int) else next(image_tokens, None)
        if n is None:
            raise ChimeraError("generate: more <image> placeholders than images")
        out.extend([t] * int(n))
    return out


def assign_images(prompts: Sequence[str], n_images: int) -> list[str]:
    """Place the images in the prompts. Prompts that write ``<image>`` take the images in order; otherwise one
    prompt takes all images, N prompts with N images one each (an ``<image>`` line before the text)."""
    from toolkit.data.markup import IMAGE

    written = sum(p.count(IMAGE) for p in prompts)
    if written:
        if written != n_images:
            raise ChimeraError(f"--prompt: {written} '{IMAGE}' placeholder(s) but {n_images} --image file(s)")
        return list(prompts)
    if n_images == 0:
        return list(prompts)
    if len(prompts) == 1:
        return [f"{IMAGE}\n" * n_images + prompts[0]]
    if len(prompts) == n_images:
        return [f"{IMAGE}\n{p}" for p in prompts]
    raise ChimeraError(
        f"--image: {n_images} images for {len(prompts)} prompts; give one image per prompt, all images to one "
        f"prompt, or write '{IMAGE}' in the prompts where each image goes"
    )


def load_images(paths: Sequence[str | Path]) -> list[Any]:
    """Image files -> Pillow images (RGB), read now (a bad file is a user error naming it)."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ChimeraError(f"--image {path}: cannot read it as an image ({exc})") from exc
    return images


def prepare_images(model: MultimodalModel, cfg: Any, images: Sequence[Any]) -> tuple[Any, Any, list[int]]:
    """Images (Pillow images or [3, H, W] tensors in [0, 1]) -> (views [V, 3, S, S], image_layout [N, 6], tokens
    per image), exactly as the experiment's training data builds them: its ``data.preprocess``, AnyRes grids,
    token budget (``toolkit.data.vision.VisionProcessor``, ``toolkit.assemble.build_vision``)."""
    if not images:
        return None, None, []
    from toolkit.assemble import build_vision

    return build_vision(cfg, model).images(list(images))


# --------------------------------------------------------------------------------------------- the command
def load_for_generation(target: str | Path) -> tuple[MultimodalModel, Any, Any]:
    """(model in eval mode, tokenizer, resolved config) from a run folder (its config.yaml and final weights, or
    its newest loadable checkpoint) or an experiment file (the model as it builds: its ``init:`` weights)."""
    from toolkit.assemble import build_model
    from toolkit.plan import RESOLVED_CONFIG, load_plan

    path = Path(target)
    if path.is_dir():
        if not (path / RESOLVED_CONFIG).is_file():
            raise ChimeraError(
                f"{target}: holds no {RESOLVED_CONFIG}; pass a run folder (runs/NAME) or a YAML file"
            )
        from toolkit.checkpointing import final_weights, load_weights, loadable_checkpoint

        plan = load_plan(path / RESOLVED_CONFIG, check_model=False)
        stage = plan.stages[-1]  # a recipe's last stage holds the final model
        weights = final_weights(stage.run_dir) or loadable_checkpoint(stage.run_dir / "checkpoints")[0]
        if weights is None:
            raise ChimeraError(f"{target}: no final weights or loadable checkpoint under {stage.run_dir}")
        model = build_model(stage.cfg, plan.tokenizer)
        load_weights(model, weights)
    elif path.is_file():
        plan = load_plan(path, check_model=False)
        stage = plan.stages[-1]
        model = build_model(stage.cfg, plan.tokenizer)
    else:
        raise ChimeraError(f"{target}: no such run folder or experiment file")
    return model.eval(), plan.tokenizer, stage.cfg


def encode_prompts(
    model: MultimodalModel,
    tokenizer: Any,
    template: Any,
    prompts: Sequence[str],
    image_tokens: Sequence[int] | None = None,
) -> list[list[int]]:
    """Prompt texts (``<image>`` where images go) -> token ids with image slots, written by ``template``.
    ``image_tokens``: each image's slots in placeholder order (``prepare_images``; None: ``model.image_tokens``
    each)."""
    from toolkit.data import image_token_id

    image_id = image_token_id(tokenizer)
    counts = model.image_tokens if image_tokens is None else iter(image_tokens)
    return [
        expand_images(render_prompt(template, tokenizer, p, f"--prompt {i}"), image_id, counts)
        for i, p in enumerate(prompts)
    ]


class TextStream:
    """Prints each row's new text as tokens arrive (decoding the whole answer so far, so multi-token words and
    spacing come out right); rows are prefixed ``[i]`` when there are several."""

    def __init__(self, tokenizer: Any, rows: int, out: Any = None) -> None:
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.printed = [""] * rows
        self.done = [False] * rows

    def __call__(self, tokens: Tensor, stops: Sequence[int] = ()) -> None:
        for i, t in enumerate(tokens.tolist()):
            if self.done[i]:
                continue
            if t in stops:
                self.done[i] = True
                continue
            self.tokens[i].append(t)
            text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            new, self.printed[i] = text[len(self.printed[i]) :], text
            if new:
                self.out.write(new if len(self.tokens) == 1 else f"[{i}] {new}\n")
                self.out.flush()


def generate_command(
    target: str,
    images: Sequence[str],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
) -> int:
    """``chimera generate TARGET --image PATH... --prompt TEXT...``: print each prompt's answer."""
    if not prompts:
        raise ChimeraError("generate: give at least one --prompt")
    model, tokenizer, cfg = load_for_generation(target)
    template = template_of(cfg)
    texts = assign_images(prompts, len(images))
    views, layout, counts = prepare_images(model, cfg, load_images(images))
    ids = encode_prompts(model, tokenizer, template, texts, counts)
    stops = end_of_turn_ids(template, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    printer = TextStream(tokenizer, len(ids)) if stream else None
    result = generate(
        model,
        ids,
        views,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_id,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        streamer=(lambda tokens: printer(tokens, stops)) if printer else None,
        image_layout=layout,
    )
    if stream:
        print()
        return 0
    for i, row in enumerate(result.tokens):
        text = tokenizer.decode([t for t in row if t not in stops], skip_special_tokens=True)
        print(text if len(prompts) == 1 else f"[{i}] {text}")
    return 0


def template_of(cfg: Any) -> Any:
    """The prompt template an experiment trains with (``data.template``; default ``vicuna_v1``)."""
    from omegaconf import OmegaConf

    from toolkit.data.template import build_template

    node = cfg.data.get("template")
    return build_template(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node)
