"""Mamba-2 <-> a ``HybridDecoder`` of Mamba-2 mixers with no FFN (pattern ``MMM...``; Dao & Gu, arXiv
2405.21060; ``state-spaces/mamba2-*``, Codestral Mamba). Reference: transformers
``models/mamba2/modeling_mamba2.py``.

Maps when every head is an SSM head (``num_heads * head_dim == expand * hidden_size``), the gated norm is
applied after the gate (transformers' only mode) and ``time_step_limit`` is the default (0, inf): the mixer
has no dt clamp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from toolkit.convert.keymap import Family, KeyMap, require, unsupported
from toolkit.errors import ChimeraError

_MIXER = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D")
_MIXER += ("norm.weight", "out_proj.weight", "out_proj.bias")

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
    where = "config.json (mamba2)"
    if cfg.get("hidden_act", "silu") != "silu":
        raise unsupported(where, f"hidden_act '{cfg['hidden_act']}'")
    d_model = int(require(cfg, "hidden_size", where))
    expand = int(cfg.get("expand", 2))
    head_dim, n_heads = int(cfg.get("head_dim", 64)), int(require(cfg, "num_heads", where))
    if n_heads * head_dim != expand * d_model:
        raise unsupported(
            where,
            f"num_heads * head_dim ({n_heads} * {head_dim}) != expand * hidden_size ({expand * d_model})",
        )
    limit = cfg.get("time_step_limit") or (0.0, math.inf)
    lo, hi = (float(v["__float__"]) if isinstance(v, Mapping) else float(v) for v in limit)
    if lo > 0.0 or hi != math.inf:
        raise unsupported(where, f"time_step_limit {list(limit)} (only (0, inf))")
    return {
        "d_model": d_model,
        "n_layers": None,
        "pattern": "M" * int(require(cfg, "num_hidden_layers", where)),
        "vocab_size": int(require(cfg, "vocab_size", where)),
        "norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "mixers": {
            "mamba2": {
                "d_state": int(cfg.get("state_size", 128)),
                "d_conv": int(cfg.get("conv_kernel", 4)),
                "expand": expand,
                "headdim": head_dim,
                "ngroups": int(cfg.get("n_groups", 1)),
                "norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5)),
                "bias": bool(cfg.get("use_bias", False)),
                "conv_bias": bool(cfg.get("use_conv_bias", True)),
            }
        },
    }


def to_hf(decoder: nn.Module, model_type: str = "mamba2") -> dict[str, Any]:
    where = "export as mamba2"
    if any(layer != "M" for layer in decoder.layer_pattern):
        raise ChimeraError(
            f"{where}: pattern {decoder.pattern!r} is not Mamba-2 layers without FFNs ('MMM...')"
        )
    m = decoder.layers[0].mixer
    if m.d_ssm != m.d_inner or m.D_has_hdim or not m.rmsnorm or m.norm.norm_before_gate:
        raise unsupported(where, "Mamba-2 with d_ssm < d_inner, D per channel, or a norm before the gate")
    return {
        "model_type": "mamba2",
        "architectures": ["Mamba2ForCausalLM"],
        "hidden_size": decoder.d_model,
        "num_hidden_layers": len(decoder.layers),
        "vocab_size": decoder.vocab_size,
        "state_size": m.d_state,
        "conv_kernel": m.d_conv,
        "expand": m.expand,
        "head_dim": m.headdim,
        "num_heads": m.nheads,
        "n_groups": m.ngroups,
        "use_conv_bias": m.conv1d.bias is not None,
        "use_bias": m.in_proj.bias is not None,
        "layer_norm_epsilon": decoder.final_norm.eps,
        "tie_word_embeddings": decoder.lm_head.weight is decoder.embed_tokens.weight,
        "chunk_size": m.chunk_size,
        "hidden_act": "silu",
    }


FAMILY = Family(
    name="mamba2",
    model_types=("mamba2",),
    base_prefix="backbone.",
    keymap=KEYMAP,
    to_decoder=to_decoder,
    to_hf=to_hf,
    architectures={"mamba2": "Mamba2ForCausalLM"},
)
