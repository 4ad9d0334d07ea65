"""Jamba <-> a ``jamba``-style ``HybridDecoder``: Mamba-1 layers with inner RMSNorms on dt/B/C, attention
without positions every ``attn_layer_period`` layers, MoE FFNs every ``expert_layer_period`` layers (Lieber et
al., arXiv 2403.19887; LongLLaVA's decoder). Reference: transformers ``models/jamba/modeling_jamba.py``.

Checkpoints store experts one by one (``feed_forward.experts.{e}.gate_proj.weight``, the layout transformers 5
saves and the released models use); transformers 5's in-memory fused layout (``experts.gate_up_proj`` [E, 2F,
D], gate rows first; ``experts.down_proj`` [E, D, F]) is read too. A layer with one expert is a dense SwiGLU
(``feed_forward.gate_proj``), which is also how ``moe`` with ``n_experts: 1`` names its weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from toolkit.convert.keymap import Family, KeyMap, require, unsupported
from toolkit.convert.load import Source
from toolkit.errors import ChimeraError

_MAMBA = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight")
_MAMBA += ("dt_proj.bias", "A_log", "D", "out_proj.weight", "out_proj.bias")
_MAMBA += ("dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight")
_ATTN = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
_FFN = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

KEYMAP = KeyMap(
    {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.layers.{}.input_layernorm.weight": "layers.{}.mixer_norm.weight",
        **{f"model.layers.{{}}.mamba.{n}": f"layers.{{}}.mixer.{n}" for n in _MAMBA},
        **{f"model.layers.{{}}.self_attn.{n}": f"layers.{{}}.mixer.{n}" for n in _ATTN},
        "model.layers.{}.pre_ff_layernorm.weight": "layers.{}.ffn_norms.0.weight",
        **{f"model.layers.{{}}.feed_forward.{n}": f"layers.{{}}.ffns.0.{n}" for n in _FFN},
        "model.layers.{}.feed_forward.router.weight": "layers.{}.ffns.0.router.weight",
        **{
            f"model.layers.{{}}.feed_forward.experts.{{}}.{n}": f"layers.{{}}.ffns.0.experts.{{}}.{n}"
            for n in _FFN
        },
        "model.final_layernorm.weight": "final_norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
)

_FUSED = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


def split(hf_key: str, shape: tuple[int, ...]) -> dict[str, Source] | None:
    """transformers 5's fused expert tensors -> one Source per expert parameter."""
    match = _FUSED.match(hf_key)
    if match is None or len(shape) != 3:
        return None
    layer, name = match.groups()
    n_experts, rows, cols = shape
    out: dict[str, Source] = {}
    for e in range(n_experts):
        base = f"layers.{layer}.ffns.0.experts.{e}"
        if name == "down_proj":
            out[f"{base}.down_proj.weight"] = Source((hf_key,), (rows, cols), lambda t, e=e: t[0][e].clone())
        else:
            half = rows // 2
            out[f"{base}.gate_proj.weight"] = Source(
                (hf_key,), (half, cols), lambda t, e=e, h=half: t[0][e, :h].clone()
            )
            out[f"{base}.up_proj.weight"] = Source(
                (hf_key,), (half, cols), lambda t, e=e, h=half: t[0][e, h:].clone()
            )
    return out


def to_decoder(cfg: Mapping[str, Any]) -> dict[str, Any]:
    where = "config.json (jamba)"
    if cfg.get("hidden_act", "silu") != "silu":
        raise unsupported(where, f"hidden_act '{cfg['hidden_act']}' (SwiGLU needs silu)")
    d_model = int(require(cfg, "hidden_size", where))
    n_layers = int(require(cfg, "num_hidden_layers", where))
    attn_period, attn_offset = int(cfg.get("attn_layer_period", 8)), int(cfg.get("attn_layer_offset", 4))
    exp_period, exp_offset = int(cfg.get("expert_layer_period", 2)), int(cfg.get("expert_layer_offset", 1))
    n_experts = int(cfg.get("num_experts", 16))
    pattern = "".join(
        ("*" if i % attn_period == attn_offset else "m")
        + ("E" if n_experts > 1 and i % exp_period == exp_offset else "-")
        for i in range(n_layers)
    )
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    n_heads = int(require(cfg, "num_attention_heads", where))
    d_ff = int(require(cfg, "intermediate_size", where))
    dt_rank = cfg.get("mamba_dt_rank", "auto")
    ffns: dict[str, Any] = {"mlp": {"d_ff": d_ff}}
    if "E" in pattern:
        ffns["moe"] = {
            "d_ff": d_ff,
            "n_experts": n_experts,
            "top_k": int(cfg.get("num_experts_per_tok", 2)),
            "aux_loss_coef": float(cfg.get("router_aux_loss_coef", 0.001)),
        }
    return {
        "d_model": d_model,
        "n_layers": None,
        "pattern": pattern,
        "vocab_size": int(require(cfg, "vocab_size", where)),
        "norm_eps": eps,
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "mixers": {
            "attention": {
                "n_heads": n_heads,
                "n_kv_heads": int(cfg.get("num_key_value_heads") or n_heads),
                "pos_emb": "none",
            },
            "mamba": {
                "d_state": int(cfg.get("mamba_d_state", 16)),
                "d_conv": int(cfg.get("mamba_d_conv", 4)),
                "expand": int(cfg.get("mamba_expand", 2)),
                "dt_rank": "auto" if dt_rank == "auto" else int(dt_rank),
                "conv_bias": bool(cfg.get("mamba_conv_bias", True)),
                "bias": bool(cfg.get("mamba_proj_bias", False)),
                "inner_norms": True,
                "norm_eps": eps,
            },
        },
        "ffns": ffns,
    }


def _period(indices: list[int], n_layers: int, what: str) -> tuple[int, int]:
    """(period, offset) with ``i % period == offset`` exactly for ``indices``."""
    if not indices:
        raise ChimeraError(f"export as jamba: the decoder has no {what} layer; Jamba needs at least one")
    offset = indices[0]
    for period in range(offset + 1, n_layers + 1):
        if [i for i in range(n_layers) if i % period == offset] == indices:
            return period, offset
    raise ChimeraError(
        f"export as jamba: {what} layers {indices} are not every k-th layer (i % period == offset), "
        "which is all a Jamba config can say"
    )


def to_hf(decoder: nn.Module, model_type: str = "jamba") -> dict[str, Any]:
    where = "export as jamba"
    layers = decoder.layer_pattern
    n = len(layers)
    if any(len(layer) != 2 or layer[0] not in "*m" or layer[1] not in "-E" for layer in layers):
        raise ChimeraError(
            f"{where}: pattern {decoder.pattern!r} is not Jamba's (each layer attention or Mamba-1, then MLP or MoE)"
        )
    attn_period, attn_offset = _period([i for i, ly in enumerate(layers) if ly[0] == "*"], n, "attention")
    moe_layers = [i for i, ly in enumerate(layers) if ly[1] == "E"]
    att = decoder.layers[attn_offset].mixer
    mamba = next((decoder.layers[i].mixer for i, ly in enumerate(layers) if ly[0] == "m"), None)
    if att.pos_emb != "none" or att.q_proj.bias is not None:
        raise unsupported(where, "attention with positions or biases (Jamba has neither)")
    cfg: dict[str, Any] = {
        "model_type": "jamba",
        "architectures": ["JambaForCausalLM"],
        "hidden_size": decoder.d_model,
        "num_hidden_layers": n,
        "num_attention_heads": att.n_heads,
        "num_key_value_heads": att.n_kv_heads,
        "attn_layer_period": attn_period,
        "attn_layer_offset": attn_offset,
        "rms_norm_eps": decoder.final_norm.eps,
        "vocab_size": decoder.vocab_size,
        "tie_word_embeddings": decoder.lm_head.weight is decoder.embed_tokens.weight,
        "hidden_act": "silu",
        "use_mamba_kernels": False,
    }
    if att.head_dim * att.n_heads != decoder.d_model:
        raise unsupported(where, "head_dim * n_heads != d_model")
    if moe_layers:
        period, offset = _period(moe_layers, n, "MoE")
        moe = decoder.layers[offset].ffns[0]
        if moe.norm_topk_prob:
            raise unsupported(where, "MoE with renormalised top-k weights")
        cfg |= {
            "expert_layer_period": period,
            "expert_layer_offset": offset,
            "num_experts": moe.n_experts,
            "num_experts_per_tok": moe.top_k,
            "router_aux_loss_coef": moe.aux_loss_coef,
        }
    else:
        cfg |= {
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 1,
            "num_experts_per_tok": 1,
        }
    d_ffs = {
        ffn.down_proj.in_features if hasattr(ffn, "down_proj") else ffn.d_ff
        for ly in decoder.layers
        for ffn in ly.ffns
    }
    if len(d_ffs) != 1:
        raise unsupported(where, f"FFN widths that differ between layers ({sorted(d_ffs)})")
    cfg["intermediate_size"] = d_ffs.pop()
    if mamba is not None:
        if not mamba.inner_norms:
            raise unsupported(where, "Mamba layers without the inner dt/B/C norms")
        cfg |= {
            "mamba_d_state": mamba.d_state,
            "mamba_d_conv": mamba.d_conv,
            "mamba_expand": mamba.expand,
            "mamba_dt_rank": mamba.dt_rank,
            "mamba_conv_bias": mamba.conv1d.bias is not None,
            "mamba_proj_bias": mamba.in_proj.bias is not None,
        }
        if mamba.dt_layernorm.eps != decoder.final_norm.eps:
            raise unsupported(where, "Mamba inner norms with an eps other than the decoder's norm_eps")
    return cfg


FAMILY = Family(
    name="jamba",
    model_types=("jamba",),
    base_prefix="model.",
    keymap=KEYMAP,
    to_decoder=to_decoder,
    to_hf=to_hf,
    architectures={"jamba": "JambaForCausalLM"},
    split=split,
)
