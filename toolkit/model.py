"""MultimodalModel: encoder -> pooler -> connector -> splice into text embeddings -> decoder -> logits.

Read top to bottom (nanoGPT style). Image features land in the text at the positions of the image token:
the collator expands each ``<image>`` placeholder into exactly ``image_tokens`` copies of ``image_token_id``
and the model writes the connector's output there with one ``masked_scatter`` (as transformers' LLaVA does),
so there is no Python loop over samples and positions are fixed for FSDP, packing and generation alike.

The four parts are built through the registry from ``model:`` config nodes; widths and grids flow from one
part to the next (the pooler gets the encoder's patch grid, the connector the encoder's and decoder's widths).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.errors import ChimeraError
from toolkit.registry import build
from toolkit.token_plan import ImageNewline, TokenPlan, VisionSettings

PARTS = ("encoder", "pooler", "connector", "decoder")


class MultimodalModel(nn.Module):
    """A LLaVA-style model assembled from four registered parts."""

    def __init__(
        self,
        encoder: nn.Module,
        pooler: nn.Module,
        connector: nn.Module,
        decoder: nn.Module,
        *,
        image_token_id: int,
        pool_after_connector: bool = False,
        vision: VisionSettings | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.pooler, self.connector, self.decoder = encoder, pooler, connector, decoder
        self.image_token_id = image_token_id
        self.pool_after_connector = pool_after_connector  # LLaVA-NeXT-Video pools after the projector
        # The token plan (toolkit/token_plan.py): the collator counts image slots with the same object.
        if pool_after_connector or getattr(connector, "num_tokens", None) is None:
            view_grid = getattr(pooler, "out_grid", None)
        else:
            view_grid = getattr(connector, "out_grid", None)
        self.token_plan = TokenPlan(
            int(encoder.image_size),
            self.image_tokens,
            tuple(view_grid) if view_grid is not None else None,
            vision or VisionSettings(),
        )
        s = self.token_plan.settings
        self.image_newline = ImageNewline(decoder.d_model) if s.anyres and s.newline else None

    @property
    def image_tokens(self) -> int:
        """Tokens one image occupies in the decoder's sequence (a token-reducing connector, such as the
        C-Abstractor, says its own count)."""
        return getattr(self.connector, "num_tokens", self.pooler.num_tokens)

    def encode_images(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] in [0, 1] -> [N, image_tokens, d_model]."""
        feats = self.encoder(images)  # [N, P, C_enc]
        if self.pool_after_connector:
            return self.pooler(self.connector(feats))  # [N, P', d_model]
        return self.connector(self.pooler(feats))  # [N, P', d_model]

    def embed(
        self, input_ids: Tensor, images: Tensor | None = None, image_layout: Tensor | None = None
    ) -> Tensor:
        """Text embeddings with image features written at the image-token positions. -> [B, T, d_model].

        images: [V, 3, H, W], every view of the batch (one encoder call). image_layout: [N, 6] token-plan rows
        (the collator's; None: each view is one image of ``image_tokens`` tokens).
        """
        embeds = self.decoder.embed(input_ids)  # [B, T, D]
        is_image = input_ids == self.image_token_id  # [B, T]
        n_slots = int(is_image.sum())
        n_views = 0 if images is None else images.shape[0]
        if image_layout is None:
            expected = n_views * self.image_tokens
            what = f"{n_views} images x {self.image_tokens} tokens = {expected}"
        else:
            expected = sum(self.token_plan.tokens(r) for r in image_layout.tolist())
            what = f"{image_layout.shape[0]} images whose token plan gives {expected} tokens"
        if n_slots != expected:
            raise ChimeraError(
                f"the batch has {n_slots} image-token positions but {what}; every <image> placeholder needs "
                "exactly one image, with the slots the token plan gives it"
            )
        if n_views == 0:
            return embeds
        feats = self.encode_images(images).to(embeds.dtype)  # [V, P', D]
        plan = self.token_plan
        if image_layout is not None and (  # AnyRes images or pooled frames: lay them out
            bool(image_layout[:, 1].any()) or (plan.frame_grid is not None and bool(image_layout[:, 5].any()))
        ):
            newline = self.image_newline() if self.image_newline is not None else None
            feats = plan.arrange(feats, image_layout, newline)  # [sum of tokens, D]
        mask = is_image.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, feats.reshape(-1))

    def forward(
        self,
        input_ids: Tensor,
        images: Tensor | None = None,
        cache: list[Any] | None = None,
        image_layout: Tensor | None = None,
    ) -> Tensor:
        """input_ids: [B, T], images: [V, 3, H, W] (image_layout: see ``embed``) -> logits [B, T, vocab]."""
        hidden = self.decoder(self.embed(input_ids, images, image_layout), cache=cache)  # [B, T, D]
        return self.decoder.logits(hidden)

    def generate(
        self,
        input_ids: Tensor | Sequence[Sequence[int]],
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
        image_layout: Tensor | None = None,
    ) -> Tensor:
        """Decode with the decoder's cache: one prefill over the prompts, then one token per step (greedy at
        ``temperature`` 0, else nucleus sampling; ``toolkit/generate.py``).

        input_ids: [B, T], or a list of prompts of different lengths (left-padded with ``pad_token_id``; the
        padding changes nothing a row computes). ``streamer`` is called with each step's tokens [B].
        images / image_layout: as for ``embed`` (``toolkit.generate.prepare_images`` builds both).
        Returns [B, T' + n]: the (padded) prompts, then n <= max_new_tokens tokens, ``pad_token_id`` after a
        row's ``eos_token_id``.
        """
        from toolkit.generate import generate

        return generate(
            self,
            input_ids,
            images,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            generator=generator,
            streamer=streamer,
            image_layout=image_layout,
        ).sequences


def build_model(
    model_cfg: Mapping[str, Any], *, vocab_size: int, image_token_id: int, load_init: bool = True
) -> MultimodalModel:
    """Materialize the four parts from config; the decoder's vocab defaults to the tokenizer's size.

    A part node may carry ``init:`` (pretrained weights, ``toolkit/convert/parts.py``), and ``model.init`` a
    whole-model checkpoint: they are applied after the build when ``load_init`` and the default device is not
    meta. A decoder with ``init.hf`` takes its shape from the checkpoint and is built on the meta device, so
    its tensors are materialised straight from the file (one copy of the weights, no random init first).
    """
    from toolkit.convert import load_model_init, load_part_init, prepare_node

    for part in PARTS:
        if part not in model_cfg or model_cfg[part] is None:
            raise ChimeraError(
                f"model.{part}: missing; every model names an encoder, pooler, connector and decoder"
            )
    nodes, inits = {}, {}
    for part in PARTS:
        vocab = padded_vocab(vocab_size) if part == "decoder" else None
        nodes[part], inits[part] = prepare_node(part, model_cfg[part], f"model.{part}", vocab_size=vocab)
    load_init = load_init and torch.empty(0).device.type != "meta"
    decoder_cfg = dict(nodes["decoder"])
    if decoder_cfg.get("vocab_size") is None:
        decoder_cfg["vocab_size"] = padded_vocab(vocab_size)
    elif int(decoder_cfg["vocab_size"]) < vocab_size:
        raise ChimeraError(
            f"model.decoder.vocab_size: {decoder_cfg['vocab_size']} is smaller than the tokenizer's {vocab_size} "
            "tokens; raise it or remove it (it defaults to the tokenizer's size)",
            key="model.decoder.vocab_size",
        )
    model_cfg = {**model_cfg, **nodes}
    encoder = build("encoder", model_cfg["encoder"], "model.encoder")
    pooler = build(
        "pooler", model_cfg["pooler"], "model.pooler", grid=encoder.grid, n_tokens=encoder.num_tokens
    )
    from_file = load_init and inits["decoder"] is not None and "hf" in inits["decoder"]
    with torch.device("meta") if from_file else contextlib.nullcontext():
        decoder = build("decoder", decoder_cfg, "model.decoder")
    pool_after = bool(model_cfg.get("pool_after_connector", False))
    connector = build(
        "connector",
        model_cfg["connector"],
        "model.connector",
        in_dim=encoder.embed_dim,
        out_dim=decoder.d_model,
        grid=encoder.grid if pool_after else getattr(pooler, "out_grid", encoder.grid),  # what it receives
    )
    if pool_after and getattr(connector, "num_tokens", None) is not None:
        raise ChimeraError(
            f"model.pool_after_connector: connector '{model_cfg['connector']['name']}' reduces the tokens itself; "
            "pool before it (pool_after_connector: false) or use a connector that keeps the token count",
            key="model.pool_after_connector",
        )
    model = MultimodalModel(
        encoder,
        pooler,
        connector,
        decoder,
        image_token_id=image_token_id,
        pool_after_connector=pool_after,
        vision=VisionSettings.from_config(model_cfg.get("vision")),
    )
    if load_init:
        if model_cfg.get("init") is not None:
            load_model_init(model, model_cfg["init"])
        for part, init in inits.items():
            if init is not None:
                load_part_init(model, part, init)
    return model


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up so the embedding and head have tensor-core friendly shapes."""
    return multiple * ((n + multiple - 1) // multiple)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters; shared tensors (tied embeddings) count once."""
    seen, total, trainable = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable
