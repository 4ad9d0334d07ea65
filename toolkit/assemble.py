"""Assembly: tokenizer, model and datamodule from a resolved config (one stage's, or the experiment's).

Every command builds its objects here, in the same way: ``train`` per stage, ``describe`` on the meta
device, ``bench`` for its paired loops. Widths and grids flow between parts inside ``toolkit.model``; what
flows between the model and the data (tokens per image, the encoder's input size) flows here.
"""

from __future__ import annotations

from typing import Any

from toolkit.errors import ChimeraError
from toolkit.model import MultimodalModel


def build_tokenizer(cfg: Any) -> Any:
    """The configured tokenizer, or a word-level one over every dataset of the experiment and its stages
    (one vocabulary for all stages, so weights carry over from one stage to the next)."""
    from toolkit.config import stage_config
    from toolkit.data import dataset_vocabulary, load_tokenizer

    words: list[str] = []
    templates: list[Any] = []
    path = cfg.data.get("tokenizer")
    decoder = _plain(cfg.model.get("decoder"))
    init = decoder.get("init") if isinstance(decoder, dict) else None
    if path is None and isinstance(init, dict) and init.get("hf"):
        path = init["hf"]  # a decoder from a Hugging Face model brings its tokenizer
    if path is None:
        sources = [("", cfg)] + [
            (f"stages[{i}].", stage_config(cfg, s)) for i, s in enumerate(cfg.get("stages") or [])
        ]
        for prefix, c in sources:
            templates.append(_plain(c.data.get("template")))
            for split in ("train", "val"):
                node = c.data.get(split)
                if node is not None:
                    words += dataset_vocabulary(node, f"{prefix}data.{split}")
    return load_tokenizer(path, words, template=templates or _plain(cfg.data.get("template")))


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_model(cfg: Any, tokenizer: Any, *, init: str = "eager") -> MultimodalModel:
    """The four parts from ``cfg.model``; the decoder's vocabulary defaults to the tokenizer's size.

    ``init="meta"`` (``strategy.init: meta``): the pooler, connector and decoder are built on the meta device
    (shapes only, no memory; ``toolkit.init`` materialises them later, shard by shard), the encoder for real:
    it carries its own weights (``checkpoint_path``, ``pretrained``) and is the first part built, so it gets
    exactly the eager build's tensors.
    """
    import torch
    from omegaconf import OmegaConf

    from toolkit.data import image_token_id
    from toolkit.model import build_model as compose

    node = OmegaConf.to_container(cfg.model, resolve=True)
    if init == "eager":
        return compose(node, vocab_size=len(tokenizer), image_token_id=image_token_id(tokenizer))
    if init != "meta":
        raise ChimeraError(f"strategy.init: '{init}' is not one of eager, meta", key="strategy.init")
    from toolkit.registry import build

    late = [
        p for p in ("pooler", "connector", "decoder") if isinstance(node[p], dict) and node[p].get("init")
    ]
    if late or node.get("init"):
        raise ChimeraError(
            f"strategy.init: meta does not load pretrained `init:` weights into "
            f"{', '.join(f'model.{p}' for p in late) or 'model'} yet (only the encoder's); use strategy.init: eager",
            key="strategy.init",
        )
    with torch.device("meta"):  # draws no random numbers: the CPU generator is untouched
        model = compose(node, vocab_size=len(tokenizer), image_token_id=image_token_id(tokenizer))
    from toolkit.convert import load_part_init, prepare_node

    encoder_node, encoder_init = prepare_node("encoder", node["encoder"], "model.encoder")
    model.encoder = build("encoder", encoder_node, "model.encoder")
    if encoder_init is not None:
        load_part_init(model, "encoder", encoder_init)
    return model


def build_vision(cfg: Any, model: MultimodalModel) -> Any:
    """The data workers' vision path for ``model``: its token plan, its encoder's timm data config (an encoder
    without one gets a plain bicubic resize and a black letterbox), and ``data.preprocess`` /
    ``data.max_image_tokens`` / ``data.over_budget``."""
    from toolkit.data.vision import VisionProcessor

    size = int(model.encoder.image_size)
    data_config = getattr(model.encoder, "data_config", None) or {
        "input_size": (3, size, size),
        "interpolation": "bicubic",
        "mean": (0.0, 0.0, 0.0),
    }
    data = cfg.data
    return VisionProcessor(
        model.token_plan,
        data_config,
        preprocess=str(data.get("preprocess", "resize")),
        max_image_tokens=data.get("max_image_tokens"),
        over_budget=str(data.get("over_budget", "error")),
    )


def build_datamodule(cfg: Any, tokenizer: Any, model: MultimodalModel) -> Any:
    """Train/val data for ``model``: the collator counts each image's slots with ``model.token_plan``."""
    from omegaconf import OmegaConf

    from toolkit.data import ChimeraDataModule

    data = cfg.data
    return ChimeraDataModule(
        OmegaConf.to_container(data.train, resolve=True),
        OmegaConf.to_container(data.val, resolve=True) if data.get("val") is not None else None,
        tokenizer=tokenizer,
        image_tokens=model.image_tokens,
        image_size=model.encoder.image_size,
        batch_size=int(data.batch_size),
        val_batch_size=data.get("val_batch_size"),
        num_workers=int(data.num_workers),
        max_length=int(data.max_length),
        seed=int(cfg.seed),
        template=_plain(data.get("template")),
        vision=build_vision(cfg, model),
    )


def build_parts(cfg: Any, tokenizer: Any, *, init: str = "eager") -> tuple[MultimodalModel, Any]:
    """(model, datamodule) for one stage's config (``init``: see ``build_model``)."""
    model = build_model(cfg, tokenizer, init=init)
    return model, build_datamodule(cfg, tokenizer, model)
