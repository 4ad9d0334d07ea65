"""Pretrained weights for any part: the per-part ``init`` config key.

Every part node (``model.encoder``, ``model.connector``, ``model.decoder``, ...) may carry ``init:``; the
toolkit removes it before the node reaches the component's constructor (``split_init``) and applies it after
the model is built (``load_part_init``)::

    model:
      decoder:   {init: {hf: /models/Llama-3-8B}}            # shape AND weights of a Hugging Face model
      connector: {name: mlp, init: {path: /ckpt/mm_projector.bin, layout: llava}}
      encoder:   {name: timm_vit, ..., init: {path: /ckpt/llava-hf, layout: llava_hf}}

``init`` keys:

- ``hf``: (decoder only) a Hugging Face directory: the decoder's shape comes from its config.json
  (``decoder_node``) and its weights through the family's key map; ``name`` defaults to ``hybrid`` and other
  keys the user writes (``mixers.mamba.use_kernels``...) are merged over the checkpoint's, a contradiction
  being an error.
- ``path``: a weights file or directory (safetensors, shards, or a torch file read with
  ``weights_only=True``), with
  ``layout``: how its keys are named: ``raw`` (default: as in the file, after ``prefix``/``keys``),
  ``chimera`` (a Chimera checkpoint or ``final.safetensors``: keys relative to the model),
  ``llava`` (LLaVA / LongLLaVA: ``model.mm_projector.*``, a CLIP tower at ``model.vision_tower.vision_tower.*``)
  or ``llava_hf`` (transformers' ``LlavaForConditionalGeneration``: ``multi_modal_projector.linear_1/2``,
  ``vision_tower.vision_model.*``, ``language_model``); the decoder under ``llava``/``llava_hf`` goes through
  the family key map like ``hf``;
  ``prefix``: keep only keys starting with it, and strip it;
  ``keys``: ``{checkpoint prefix: part prefix}`` renames (keys matching none are ignored);
  ``strict`` (default true): every parameter of the part must be loaded and every selected key used.

Missing, unexpected and mis-shaped keys are one error naming them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from toolkit.convert.load import Checkpoint, Plan, Source, check_plan, iter_rename, materialize
from toolkit.errors import ChimeraError

LAYOUTS = ("raw", "chimera", "llava", "llava_hf")
INIT_KEYS = ("hf", "path", "layout", "prefix", "keys", "strict")


def split_init(node: Any) -> tuple[Any, dict[str, Any] | None]:
    """``(node without init, init)`` for a part's config node (a mapping, or a bare name)."""
    if not isinstance(node, Mapping) or "init" not in node:
        return node, None
    rest = {k: v for k, v in node.items() if k != "init"}
    init = node["init"]
    return rest, None if init is None else _plain(init)


def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(value) if isinstance(value, Mapping) else value


def validate_init(part: str, init: Any, where: str) -> dict[str, Any]:
    """Config-time checks of an ``init`` node (types and keys; the files are not read)."""
    where = f"{where}.init"
    if isinstance(init, str):
        init = {"path": init}
    if not isinstance(init, Mapping):
        raise ChimeraError(f"{where}: expected a mapping such as {{path: FILE}} or {{hf: DIR}}", key=where)
    init = dict(init)
    for key in init:
        if key not in INIT_KEYS:
            raise ChimeraError(
                f"{where}.{key}: unknown; accepted: {', '.join(INIT_KEYS)}", key=f"{where}.{key}"
            )
    if ("hf" in init) == ("path" in init):
        raise ChimeraError(f"{where}: give exactly one of 'hf' (a Hugging Face model) or 'path'", key=where)
    if "hf" in init:
        if part != "decoder":
            raise ChimeraError(f"{where}.hf: only the decoder is built from a Hugging Face model; use 'path'")
        extra = sorted(set(init) - {"hf", "strict"})
        if extra:
            raise ChimeraError(f"{where}: {', '.join(extra)} do not apply to 'hf' (its layout is known)")
    for key in ("hf", "path", "prefix"):
        if key in init and not isinstance(init[key], str):
            raise ChimeraError(f"{where}.{key}: expected a string, got {init[key]!r}", key=f"{where}.{key}")
    layout = init.get("layout", "raw")
    if layout not in LAYOUTS:
        raise ChimeraError(
            f"{where}.layout: '{layout}' unknown; one of {', '.join(LAYOUTS)}", key=f"{where}.layout"
        )
    keys = init.get("keys")
    if keys is not None and not (
        isinstance(keys, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items())
    ):
        raise ChimeraError(
            f"{where}.keys: expected {{checkpoint prefix: part prefix}} strings", key=f"{where}.keys"
        )
    if layout != "raw" and (keys is not None or "prefix" in init):
        raise ChimeraError(
            f"{where}: 'prefix'/'keys' apply to layout raw only (layout {layout} knows its keys)"
        )
    if not isinstance(init.get("strict", True), bool):
        raise ChimeraError(f"{where}.strict: expected true or false", key=f"{where}.strict")
    return init


# ------------------------------------------------------------------------------------------- decoder node
def _merge(base: dict[str, Any], user: Mapping[str, Any], where: str, *, path: str) -> dict[str, Any]:
    """``user`` over ``base``, recursively; a user leaf that contradicts ``base`` is an error."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        here = f"{where}.{key}"
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value, here, path=path)
        elif key in out and out[key] != value and key != "vocab_size":
            raise ChimeraError(
                f"{here}: {value!r} contradicts the checkpoint's config.json ({out[key]!r} from {path}); "
                "remove it (the shape comes from the checkpoint)",
                key=here,
            )
        else:
            out[key] = copy.deepcopy(value)
    return out


def decoder_node(
    node: Mapping[str, Any], where: str = "model.decoder", *, vocab_size: int | None = None
) -> dict:
    """The full decoder node for ``{init: {hf: PATH}, ...}``: the checkpoint's kwargs, the user's keys merged
    over them, ``name: hybrid``; ``vocab_size`` (e.g. the tokenizer's length) grows the vocabulary, never
    shrinks it. Reads config.json only. The returned node has no ``init``."""
    from toolkit.convert.hf_config import decoder_kwargs

    user, init = split_init(dict(node))
    init = validate_init("decoder", init, where)
    if "hf" not in init:
        raise ChimeraError(f"{where}.init: decoder_node needs init.hf")
    name = user.pop("name", "hybrid")
    if name != "hybrid":
        raise ChimeraError(f"{where}.name: a decoder from a Hugging Face model is 'hybrid', not '{name}'")
    base = {k: v for k, v in decoder_kwargs(init["hf"]).items() if v is not None}
    out = _merge(base, user, where, path=init["hf"])
    hf_vocab = int(base["vocab_size"])
    want = max(int(user.get("vocab_size") or 0), int(vocab_size or 0), hf_vocab)
    out["vocab_size"] = want
    return {"name": "hybrid", **out}


def prepare_node(
    part: str, node: Any, where: str, *, vocab_size: int | None = None
) -> tuple[Any, dict[str, Any] | None]:
    """``(constructor node, validated init or None)`` for one part: ``init`` removed, and for a decoder with
    ``init.hf`` the shape filled in from config.json. Call it before ``registry.validate``/``build``."""
    rest, init = split_init(node)
    if init is None:
        return rest, None
    init = validate_init(part, init, where)
    if "hf" in init:
        return decoder_node({**rest, "init": init}, where, vocab_size=vocab_size), init
    return rest, init


# ------------------------------------------------------------------------------------------- layouts
CLIP_ROOTS = ("model.vision_tower.vision_tower.", "model.vision_tower.", "vision_tower.")


def _clip_base(checkpoint: Checkpoint) -> str | None:
    """Where a CLIP vision tower's ``embeddings...`` keys start (LLaVA, transformers 4 and 5 layouts)."""
    for root in CLIP_ROOTS:
        for sub in ("vision_model.", ""):
            if f"{root}{sub}embeddings.patch_embedding.weight" in checkpoint:
                return root + sub
    return None


def _clip_plan(checkpoint: Checkpoint, keys: list[str], base: str, module: nn.Module, prefix: str) -> Plan:
    """A Hugging Face CLIP vision tower (keys under ``base``: ``embeddings...``, ``encoder.layers...``) -> our timm ViT
    (``TimmViT.model``: ``patch_embed``, ``cls_token``, ``pos_embed``, ``norm_pre``, ``blocks.{i}``). q/k/v join
    into timm's fused ``qkv``; blocks the encoder pruned (after ``select_layer``) and the final norm are
    skipped."""
    plan = Plan()
    target = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    n_blocks = len(
        {m.group(1) for k in target if (m := re.match(rf"^{re.escape(prefix)}blocks\.(\d+)\.", k))}
    )
    simple = {
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "pre_layrnorm.weight": "norm_pre.weight",
        "pre_layrnorm.bias": "norm_pre.bias",
    }
    block = {
        "self_attn.out_proj": "attn.proj",
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for key in keys:
        name = key[len(base) :]
        if name in simple:
            plan.sources[prefix + simple[name]] = Source((key,), checkpoint.shape(key))
        elif name == "embeddings.class_embedding":
            shape = checkpoint.shape(key)
            plan.sources[prefix + "cls_token"] = Source(
                (key,), (1, 1, *shape), lambda t: t[0].reshape(1, 1, -1)
            )
        elif name == "embeddings.position_embedding.weight":
            shape = checkpoint.shape(key)
            plan.sources[prefix + "pos_embed"] = Source((key,), (1, *shape), lambda t: t[0].unsqueeze(0))
        elif name == "embeddings.position_ids" or name.startswith("post_layernorm."):
            continue
        elif m := re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name):
            i, sub, kind = int(m.group(1)), m.group(2), m.group(3)
            if i >= n_blocks:
                continue  # pruned by the encoder (blocks after select_layer)
            if sub in block:
                plan.sources[f"{prefix}blocks.{i}.{block[sub]}.{kind}"] = Source(
                    (key,), checkpoint.shape(key)
                )
            elif sub == "self_attn.q_proj":
                parts = tuple(f"{base}encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv")
                missing = [p for p in parts if p not in checkpoint]
                if missing:
                    plan.unused.append(key)
                    continue
                shape = checkpoint.shape(key)
                plan.sources[f"{prefix}blocks.{i}.attn.qkv.{kind}"] = Source(
                    parts, (3 * shape[0], *shape[1:]), lambda t: torch.cat(t)
                )
            elif sub in ("self_attn.k_proj", "self_attn.v_proj"):
                continue  # joined with q_proj
            else:
                plan.unused.append(key)
        else:
            plan.unused.append(key)
    return plan


def _renames(part: str, init: Mapping[str, Any], module: nn.Module) -> dict[str, str] | None:
    """``{checkpoint prefix: part prefix}`` for a ``path`` init, or None when the layout needs a converter."""
    layout = init.get("layout", "raw")
    if layout == "raw":
        if init.get("keys") is not None:
            return dict(init["keys"])
        return {init.get("prefix", ""): ""}
    if layout == "chimera":
        return {f"{part}.": "", f"model.{part}.": ""}
    if layout == "llava" and part == "connector":
        return {"model.mm_projector.": "proj."}
    if layout == "llava_hf" and part == "connector":
        return {
            f"{root}multi_modal_projector.linear_{i + 1}.": f"proj.{2 * i}."
            for root in ("model.", "")
            for i in range(2)
        }
    if layout in ("llava", "llava_hf") and part in ("encoder", "decoder"):
        return None
    raise ChimeraError(f"init layout '{layout}' has no weights for the {part}")


def _encoder_prefix(module: nn.Module) -> str:
    """Where the timm ViT sits inside the encoder part (``model.`` for ``timm_vit``)."""
    names = module.state_dict().keys()
    for name in names:
        if name.endswith("patch_embed.proj.weight"):
            return name[: -len("patch_embed.proj.weight")]
    raise ChimeraError(
        "the encoder has no ViT patch embedding (patch_embed.proj.weight) to load CLIP weights into"
    )


def load_part_init(model: nn.Module, part: str, init: Mapping[str, Any], *, where: str | None = None) -> None:
    """Apply the ``init`` of ``part`` (encoder, connector, decoder, ...) to ``model``: a ``MultimodalModel``, or
    the part itself (a module without a ``part`` attribute); ``part`` "" loads into ``model`` as a whole.

    Parameters still on the meta device are materialised from the checkpoint tensors (no second copy);
    others get the values copied in. See the module docstring for the keys.
    """
    where = where or (f"model.{part}" if part else "model")
    init = validate_init(part, init, where)
    inner = getattr(model, part, None) if part else None
    module = inner if isinstance(inner, nn.Module) else model
    strict = init.get("strict", True)
    if "hf" in init:
        from toolkit.convert.decoder import load_hf_weights

        load_hf_weights(module, init["hf"])
        return
    path = init["path"]
    layout = init.get("layout", "raw")
    if part == "decoder" and layout in ("llava", "llava_hf"):
        from toolkit.convert.decoder import load_hf_weights

        load_hf_weights(module, path)
        return
    checkpoint = Checkpoint(path)
    renames = _renames(part, init, module)
    if renames is None:  # a CLIP vision tower into the encoder
        base = _clip_base(checkpoint)
        if base is None:
            raise ChimeraError(
                f"{where}.init: {path} has no CLIP vision tower (looked under {', '.join(CLIP_ROOTS)})"
            )
        keys = [k for k in checkpoint.names() if k.startswith(base)]
        plan = _clip_plan(checkpoint, keys, base, module, _encoder_prefix(module))
    else:
        plan = Plan()
        for key, target in iter_rename(checkpoint.names(), renames):
            plan.sources[target] = Source((key,), checkpoint.shape(key))
        if not plan.sources:
            raise ChimeraError(
                f"{where}.init: no key of {path} starts with {', '.join(repr(p) for p in renames)} "
                f"(the file has e.g. {', '.join(checkpoint.names()[:5])})"
            )
    if strict:
        check_plan(plan, module, f"{where}.init ({path})")
    else:
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        plan.sources = {k: s for k, s in plan.sources.items() if k in expected}
        check_plan(
            plan, module, f"{where}.init ({path})", optional=[k for k in expected if k not in plan.sources]
        )
    materialize(module, plan, checkpoint)


def load_model_init(model: nn.Module, init: Mapping[str, Any], parts: tuple[str, ...] = ()) -> list[str]:
    """A whole-model ``init`` (``model.init: {path: DIR, layout: llava_hf}``): every part that has weights in
    that layout, or ``parts``. ``raw`` loads the file into the model as a whole (keys relative to it).

    ``chimera``: every part with parameters; ``llava`` / ``llava_hf``: the connector and the decoder, and the
    encoder when the checkpoint holds a CLIP vision tower (LLaVA's own releases usually do not). Returns the
    parts loaded.
    """
    init = validate_init("model", init, "model")
    layout = init.get("layout", "raw")
    if layout == "raw":
        load_part_init(model, "", init, where="model")
        return [""]
    if not parts:
        with_params = [
            p
            for p in ("encoder", "pooler", "connector", "decoder")
            if next(getattr(model, p).parameters(), None) is not None
        ]
        if layout == "chimera":
            parts = tuple(with_params)
        else:
            has_tower = _clip_base(Checkpoint(init["path"])) is not None
            parts = tuple(
                p for p in with_params if p in ("connector", "decoder") or (p == "encoder" and has_tower)
            )
    for part in parts:
        load_part_init(model, part, init)
    return list(parts)
