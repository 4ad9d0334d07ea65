"""Vision encoder: any timm VisionTransformer (CLIP, SigLIP, ...) as a frozen patch-feature extractor.

LLaVA 1.5 (Liu et al., "Improved Baselines with Visual Instruction Tuning", arXiv 2310.03744) takes CLIP
ViT-L/14-336 features from the penultimate layer (``hidden_states[-2]``) and drops the CLS token, giving
24 x 24 = 576 tokens of width 1024 per image; LongLLaVA (arXiv 2409.02889) keeps the same tower. Reference
code: haotian-liu/LLaVA ``llava/model/multimodal_encoder/clip_encoder.py``; timm's ``forward_intermediates``
and ``prune_intermediate_layers`` (``timm/models/vision_transformer.py``) do the work here.

Layer indexing: ``select_layer`` indexes the transformer blocks like a Python list (0 = first block,
-1 = last block). For negative values this is exactly Hugging Face's ``hidden_states[select_layer]`` used
by LLaVA (``hidden_states`` holds the embeddings followed by the output of every block, so
``hidden_states[-2]`` is the output of the second-to-last block); a positive value ``i`` equals
``hidden_states[i + 1]``. The features are the raw block output, before any final norm, as in LLaVA.

Activation: timm's ``vit_large_patch14_clip_336.openai`` uses GELU while OpenAI's weights were trained with
QuickGELU (timm's cfg notes it); for faithful features from real OpenAI weights pass
``model_args: {act_layer: quick_gelu}`` or use ``vit_large_patch14_clip_quickgelu_336.openai``. Both build
the same parameters.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import load_state_dict
from torch import nn

from components.encoders.preprocess import Mode, make_transform
from toolkit.errors import ChimeraError
from toolkit.registry import register

# Arguments the encoder sets itself; a model_args entry for one of them would silently fight it.
_RESERVED_MODEL_ARGS = ("pretrained", "num_classes", "img_size", "pretrained_cfg_overlay", "checkpoint_path")


@register("encoder", "timm_vit")
class TimmViT(nn.Module):
    """A timm VisionTransformer (CLIP, SigLIP, ...) giving patch features of one block (LLaVA 1.5 style).

    Shapes: images ``[N, 3, image_size, image_size]`` with values in [0, 1] (normalised inside with the
    mean/std of timm's pretrained cfg) -> features ``[N, num_tokens, embed_dim]``, where
    ``num_tokens = grid[0] * grid[1]`` when prefix tokens (CLS, registers) are dropped, else
    ``num_prefix_tokens + grid[0] * grid[1]`` and ``grid`` is None.

    Examples: ``vit_large_patch14_clip_336.openai`` -> grid (24, 24), embed_dim 1024, 576 tokens;
    ``vit_so400m_patch14_siglip_384`` -> grid (27, 27), embed_dim 1152, 729 tokens (no CLS).

    Args:
        model_name: timm model name, optionally with a pretrained tag (``arch.tag``).
        pretrained: let timm fetch its pretrained weights (hub or local cache); ignored when
            ``checkpoint_path`` is given.
        checkpoint_path: local file (``.safetensors``, ``.pth``, ``.bin``) with weights of the full timm
            model (timm, open_clip or OpenAI layout: timm's checkpoint filter converts them and resamples
            the position embedding to ``img_size``). Nothing is downloaded.
        img_size: input side in pixels; None keeps the model's default (336 for the CLIP above).
        select_layer: block whose output is returned (list indexing; -2 = penultimate, as LLaVA).
        drop_prefix_tokens: return patch tokens only (CLS/register tokens dropped).
        freeze: no parameter trains and the tower stays in eval mode even under ``.train()``.
        model_args: extra ``timm.create_model`` kwargs (embed_dim, depth, num_heads, patch_size, act_layer...).

    Blocks after ``select_layer``, the final norm and the head are pruned: they cost neither compute nor
    parameters. The timm model lives at ``.model`` (parameter names ``model.blocks.0.attn.qkv.weight``...).
    """

    def __init__(
        self,
        model_name: str = "vit_large_patch14_clip_336.openai",
        *,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        img_size: int | None = None,
        select_layer: int = -2,
        drop_prefix_tokens: bool = True,
        freeze: bool = True,
        model_args: dict | None = None,
    ) -> None:
        super().__init__()
        model_args = dict(model_args or {})
        reserved = sorted(set(model_args) & set(_RESERVED_MODEL_ARGS))
        if reserved:
            raise ChimeraError(
                f"model_args may not set {', '.join(reserved)}: use the encoder's own arguments "
                "(pretrained, checkpoint_path, img_size)"
            )
        if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
            raise ChimeraError(f"encoder checkpoint_path '{checkpoint_path}' does not exist or is not a file")
        _check_model_name(model_name)
        if pretrained and checkpoint_path is None:
            check_pretrained_available(model_name)
        if img_size is not None:
            model_args["img_size"] = img_size
        model = timm.create_model(
            model_name, pretrained=pretrained and checkpoint_path is None, num_classes=0, **model_args
        )
        missing = [
            a
            for a in ("blocks", "patch_embed", "forward_intermediates", "prune_intermediate_layers")
            if not hasattr(model, a)
        ]
        if missing:
            raise ChimeraError(
                f"timm model '{model_name}' ({type(model).__name__}) is not a VisionTransformer-like model "
                f"(it lacks {', '.join(missing)}); timm_vit needs a ViT such as vit_large_patch14_clip_336.openai"
            )
        if checkpoint_path is not None:
            _load_checkpoint(model, checkpoint_path)

        depth = len(model.blocks)
        if not -depth <= select_layer < depth:
            raise ChimeraError(
                f"select_layer {select_layer} is out of range for '{model_name}' with {depth} blocks "
                f"(use {-depth}..{depth - 1}; -2 is the penultimate block)"
            )
        self.select_layer = select_layer
        # Keep blocks [0, select_layer]; drop the final norm, fc_norm, attention-pool and classifier head.
        model.prune_intermediate_layers([select_layer], prune_norm=True, prune_head=True)
        self.model = model
        self.depth = depth  # blocks of the un-pruned model
        self.drop_prefix_tokens = drop_prefix_tokens
        self.freeze = freeze

        self.embed_dim: int = int(model.embed_dim)
        self.num_prefix_tokens: int = int(getattr(model, "num_prefix_tokens", 0))
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        self.patch_grid: tuple[int, int] = (grid[0], grid[1])
        self.grid: tuple[int, int] | None = self.patch_grid if drop_prefix_tokens else None
        n_patches = self.patch_grid[0] * self.patch_grid[1]
        self.num_tokens: int = n_patches if drop_prefix_tokens else n_patches + self.num_prefix_tokens
        self.image_size: int = int(model.patch_embed.img_size[0])

        data_config = resolve_model_data_config(model)
        data_config["input_size"] = (3, *model.patch_embed.img_size)
        self.data_config: dict[str, Any] = data_config
        self._mean = tuple(float(v) for v in data_config["mean"])
        self._std = tuple(float(v) for v in data_config["std"])
        self.register_buffer("mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, 3, 1, 1), persistent=False)
        self.reset_parameters()

        if freeze:
            self.requires_grad_(False)
            self.train(False)

    def reset_parameters(self) -> None:
        """Fill the normalisation buffers (also after ``to_empty`` materialises a meta-built encoder).

        Only the encoder's own buffers are touched: the timm weights come from ``checkpoint_path``, from
        timm's initialisation or from the checkpoint being resumed.
        """
        if self.mean.is_meta:
            return
        with torch.no_grad():
            self.mean.copy_(torch.tensor(self._mean).view(1, 3, 1, 1))
            self.std.copy_(torch.tensor(self._std).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> TimmViT:
        """A frozen tower stays in eval mode (dropout, drop-path off) whatever the parent asks."""
        return super().train(mode and not self.freeze)

    def shard_units(self) -> list[nn.Module]:
        """The transformer blocks: the FSDP wrap units of this encoder."""
        return list(self.model.blocks)

    def transform(self, mode: Mode = "pad") -> Callable[[Any], torch.Tensor]:
        """PIL image -> ``[3, image_size, image_size]`` in [0, 1] from this tower's timm data config
        (``resize``, ``center_crop`` or LLaVA-1.5's ``pad``; see ``components/encoders/preprocess.py``)."""
        return make_transform(self.data_config, mode)

    def preprocess(self, image: Any, mode: Mode = "pad") -> torch.Tensor:
        """One PIL image -> ``[3, image_size, image_size]`` in [0, 1] (normalisation happens in forward)."""
        return self.transform(mode)(image)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[N, 3, H, W]`` in [0, 1] -> features ``[N, num_tokens, embed_dim]``."""
        x = (images.to(self.mean.dtype) - self.mean) / self.std  # [N, 3, H, W]
        # After pruning, the selected block is the last one left.
        out = self.model.forward_intermediates(
            x,
            indices=[len(self.model.blocks) - 1],
            return_prefix_tokens=not self.drop_prefix_tokens,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]
        if self.drop_prefix_tokens:
            return out  # [N, gh * gw, C]
        patches, prefix = out if isinstance(out, tuple) else (out, None)
        if prefix is None:
            return patches
        return torch.cat([prefix, patches], dim=1)  # [N, prefix + gh * gw, C]

    @classmethod
    def validate_config(cls, kwargs: dict[str, Any], where: str) -> None:
        """Config-time checks (nothing built): the timm name exists, and pretrained weights can be had."""
        name = str(kwargs.get("model_name", "vit_large_patch14_clip_336.openai"))
        try:
            _check_model_name(name)
            if kwargs.get("pretrained") and kwargs.get("checkpoint_path") is None:
                check_pretrained_available(name)
        except ChimeraError as exc:
            raise ChimeraError(f"{where}: {exc}", key=where) from exc

    def extra_repr(self) -> str:
        return (
            f"select_layer={self.select_layer}, blocks={len(self.model.blocks)}/{self.depth}, "
            f"grid={self.grid}, num_tokens={self.num_tokens}, freeze={self.freeze}"
        )


def check_pretrained_available(model_name: str, timeout_s: float = 3.0) -> None:
    """``pretrained: true`` without ``checkpoint_path``: the weights must be in the local Hugging Face cache,
    or the hub must answer within ``timeout_s``; else fail now, with what to do, instead of after timm's
    retries (about a minute offline)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name) if "." in model_name else None
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return  # a URL-hosted or unknown source: timm reports it itself
    from huggingface_hub import try_to_load_from_cache

    names = [getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"]
    names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names if n):
        return
    reason = "HF_HUB_OFFLINE is set"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
        import socket

        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
            return  # reachable: timm downloads on first use
        except OSError as exc:
            reason = f"huggingface.co is unreachable ({exc.__class__.__name__})"
    raise ChimeraError(
        f"pretrained weights of '{model_name}' ({repo}) are not in the local cache and {reason}; set "
        "checkpoint_path to a local weights file, or fetch them once where the hub is reachable "
        f"(python -c \"import timm; timm.create_model('{model_name}', pretrained=True)\")"
    )


def _check_model_name(model_name: str) -> None:
    """Unknown architectures or pretrained tags fail with timm's close matches (no network needed)."""
    if ":" in model_name:  # hf-hub:org/name, local-dir:/path: timm resolves these itself
        return
    arch, _, tag = model_name.partition(".")
    if not timm.is_model(arch):
        matches = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        family = arch.split("_")[0]
        hint = f"; close matches: {', '.join(matches)}" if matches else ""
        raise ChimeraError(
            f"unknown timm model '{model_name}'{hint} (list them with timm.list_models('{family}*'))"
        )
    if tag:
        tags = timm.list_pretrained(f"{arch}.*")
        if model_name not in tags:
            raise ChimeraError(
                f"timm model '{arch}' has no pretrained tag '{tag}'; available: {', '.join(tags) or 'none'}"
            )


def _load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a full-model checkpoint strictly (the classifier head excepted), converting its layout.

    The model family's ``checkpoint_filter_fn`` (timm's own pretrained-weights filter) converts OpenAI /
    open_clip layouts and resamples position embeddings; every other key must match, so a wrong file fails
    loudly instead of leaving random weights behind.
    """
    try:
        state_dict = load_state_dict(path)
    except Exception as exc:
        raise ChimeraError(f"encoder checkpoint_path '{path}' could not be read: {exc}") from exc
    family = importlib.import_module(type(model).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    classifier = model.pretrained_cfg.get("classifier") or ()
    for name in (classifier,) if isinstance(classifier, str) else classifier:
        state_dict.pop(f"{name}.weight", None)
        state_dict.pop(f"{name}.bias", None)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ChimeraError(f"encoder checkpoint_path '{path}' does not fit the model: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ChimeraError(
            f"encoder checkpoint_path '{path}' does not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
