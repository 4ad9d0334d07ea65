"""Mamba (-1) <-> a ``HybridDecoder`` of Mamba mixers with no FFN (pattern ``mmm...``) and no inner norms (Gu &
Dao, arXiv 2312.00752; ``state-spaces/mamba-*-hf``). Reference: transformers ``models/mamba/modeling_mamba.py``.

The mixer's parameters have transformers' names already; the block is ``x + mixer(RMSNorm(x))`` with
``layer_norm_epsilon`` (1e-5) and the head tied to the embedding by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from toolkit.convert.keymap import Family, KeyMap, require, unsupported
from toolkit.errors import ChimeraError

_MIXER = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight")
_MIXER += ("dt_proj.bias", "A_log", "D", "out_proj.weight", "out_proj.bias")

KEYMAP = KeyMap(
    {
        "backbone.embeddings.weight": "embed_tokens.weight",
        "backbone.layers.{}.norm.weight": "layers.{}.mixer_norm.weight",
        **{f"backbone.layers.{{}}.mixer.{n}": f"layers.{{}}.mixer.{n}" for n in _MIXER},
        "backbone.norm_f.weight": "final_norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
)


def to_decoder(cfg: Mapping[str, Any]) -> dict[str, Any]:
    where = "config.json (mamba)"
    if cfg.get("hidden_act", "silu") != "silu":
        raise unsupported(where, f"hidden_act '{cfg['hidden_act']}'")
    d_model = int(require(cfg, "hidden_size", where))
    expand = int(cfg.get("expand", 2))
    if cfg.get("intermediate_size") not in (None, expand * d_model):
        raise unsupported(where, f"intermediate_size {cfg['intermediate_size']} != expand * hidden_size")
    dt_rank = cfg.get("time_step_rank", "auto")
    return {
        "d_model": d_model,
        "n_layers": None,
        "pattern": "m" * int(require(cfg, "num_hidden_layers", where)),
        "vocab_size": int(require(cfg, "vocab_size", where)),
        "norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "mixers": {
            "mamba": {
                "d_state": int(cfg.get("state_size", 16)),
                "d_conv": int(cfg.get("conv_kernel", 4)),
                "expand": expand,
                "dt_rank": "auto" if dt_rank == "auto" else int(dt_rank),
                "conv_bias": bool(cfg.get("use_conv_bias", True)),
                "bias": bool(cfg.get("use_bias", False)),
            }
        },
    }


def to_hf(decoder: nn.Module, model_type: str = "mamba") -> dict[str, Any]:
    if any(layer != "m" for layer in decoder.layer_pattern):
        raise ChimeraError(
            f"export as mamba: pattern {decoder.pattern!r} is not Mamba-1 layers without FFNs ('mmm...')"
        )
    m = decoder.layers[0].mixer
    if m.inner_norms:
        raise unsupported("export as mamba", "Mamba layers with inner dt/B/C norms (that is Jamba's mixer)")
    return {
        "model_type": "mamba",
        "architectures": ["MambaForCausalLM"],
        "hidden_size": decoder.d_model,
        "num_hidden_layers": len(decoder.layers),
        "vocab_size": decoder.vocab_size,
        "state_size": m.d_state,
        "conv_kernel": m.d_conv,
        "expand": m.expand,
        "intermediate_size": m.d_inner,
        "time_step_rank": m.dt_rank,
        "use_conv_bias": m.conv1d.bias is not None,
        "use_bias": m.in_proj.bias is not None,
        "layer_norm_epsilon": decoder.final_norm.eps,
        "tie_word_embeddings": decoder.lm_head.weight is decoder.embed_tokens.weight,
        "hidden_act": "silu",
    }


FAMILY = Family(
    name="mamba",
    model_types=("mamba",),
    base_prefix="backbone.",
    keymap=KEYMAP,
    to_decoder=to_decoder,
    to_hf=to_hf,
    architectures={"mamba": "MambaForCausalLM"},
)
