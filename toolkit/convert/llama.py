"""Llama, Mistral and Qwen2 <-> a ``transformer``-pattern ``HybridDecoder`` (attention + SwiGLU per layer).

Differences the three need: RoPE and its scaling (``rope_parameters``: default, linear, llama3, yarn), GQA,
an explicit ``head_dim``, Qwen2's q/k/v bias (o has none), Llama's ``attention_bias`` / ``mlp_bias`` and
Mistral's sliding window. References: transformers ``models/{llama,mistral,qwen2}/modeling_*.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from toolkit.convert.keymap import Family, KeyMap, require, unsupported
from toolkit.errors import ChimeraError

KEYMAP = KeyMap(
    {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.layers.{}.input_layernorm.weight": "layers.{}.mixer_norm.weight",
        "model.layers.{}.self_attn.q_proj.weight": "layers.{}.mixer.q_proj.weight",
        "model.layers.{}.self_attn.q_proj.bias": "layers.{}.mixer.q_proj.bias",
        "model.layers.{}.self_attn.k_proj.weight": "layers.{}.mixer.k_proj.weight",
        "model.layers.{}.self_attn.k_proj.bias": "layers.{}.mixer.k_proj.bias",
        "model.layers.{}.self_attn.v_proj.weight": "layers.{}.mixer.v_proj.weight",
        "model.layers.{}.self_attn.v_proj.bias": "layers.{}.mixer.v_proj.bias",
        "model.layers.{}.self_attn.o_proj.weight": "layers.{}.mixer.o_proj.weight",
        "model.layers.{}.self_attn.o_proj.bias": "layers.{}.mixer.o_proj.bias",
        "model.layers.{}.self_attn.rotary_emb.inv_freq": None,  # a buffer in old checkpoints
        "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norms.0.weight",
        "model.layers.{}.mlp.gate_proj.weight": "layers.{}.ffns.0.gate_proj.weight",
        "model.layers.{}.mlp.gate_proj.bias": "layers.{}.ffns.0.gate_proj.bias",
        "model.layers.{}.mlp.up_proj.weight": "layers.{}.ffns.0.up_proj.weight",
        "model.layers.{}.mlp.up_proj.bias": "layers.{}.ffns.0.up_proj.bias",
        "model.layers.{}.mlp.down_proj.weight": "layers.{}.ffns.0.down_proj.weight",
        "model.layers.{}.mlp.down_proj.bias": "layers.{}.ffns.0.down_proj.bias",
        "model.norm.weight": "final_norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def rope_from_config(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """HF RoPE settings (transformers 5 ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``) ->
    attention kwargs ``rope_theta``, ``rope_scaling``, ``rope_type``, ``rope_params``."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise unsupported(where, "per-layer-type RoPE parameters")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    if float(params.pop("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise unsupported(where, "partial_rotary_factor != 1")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        return out
    factor = params.pop("factor", None)
    if rope_type == "linear":
        return out | {
            "rope_scaling": float(require({"factor": factor}, "factor", f"{where}: rope_parameters"))
        }
    if rope_type in ("llama3", "yarn"):
        if params.get("original_max_position_embeddings") is None:
            params["original_max_position_embeddings"] = cfg.get(
                "original_max_position_embeddings"
            ) or cfg.get("max_position_embeddings")
        if factor is None and rope_type == "yarn":
            factor = cfg["max_position_embeddings"] / params["original_max_position_embeddings"]
        keep = {k: v for k, v in params.items() if v is not None}
        return out | {"rope_scaling": float(factor), "rope_type": rope_type, "rope_params": keep}
    raise unsupported(where, f"RoPE type '{rope_type}' (supported: default, linear, llama3, yarn)")


def rope_to_config(att: nn.Module) -> dict[str, Any]:
    """The reverse of ``rope_from_config``: transformers 5's ``rope_parameters``."""
    rope: dict[str, Any] = {"rope_theta": float(att.rope_theta)}
    if att.rope_type == "linear":
        if att.rope_scaling == 1.0:
            return rope | {"rope_type": "default"}
        return rope | {"rope_type": "linear", "factor": float(att.rope_scaling)}
    params = {k: v for k, v in att.rope_params.items() if v is not None}
    return rope | {"rope_type": att.rope_type, "factor": float(att.rope_scaling)} | params


def sliding_window(cfg: Mapping[str, Any], model_type: str, where: str) -> int | None:
    if model_type == "qwen2":
        if not cfg.get("use_sliding_window"):
            return None
        types = set(cfg.get("layer_types") or [])
        if types and types != {"sliding_attention"}:
            raise unsupported(where, "Qwen2 with sliding and full attention layers mixed (max_window_layers)")
    return cfg.get("sliding_window")


def to_decoder(cfg: Mapping[str, Any]) -> dict[str, Any]:
    model_type = cfg.get("model_type", "llama")
    where = f"config.json ({model_type})"
    if cfg.get("hidden_act", "silu") != "silu":
        raise unsupported(where, f"hidden_act '{cfg['hidden_act']}' (SwiGLU needs silu)")
    d_model = int(require(cfg, "hidden_size", where))
    n_heads = int(require(cfg, "num_attention_heads", where))
    attention: dict[str, Any] = {
        "n_heads": n_heads,
        "n_kv_heads": int(cfg.get("num_key_value_heads") or n_heads),
        "pos_emb": "rope",
        **rope_from_config(cfg, where),
    }
    if cfg.get("head_dim") and int(cfg["head_dim"]) != d_model // n_heads:
        attention["head_dim"] = int(cfg["head_dim"])
    if model_type == "qwen2":
        attention["qkv_bias"] = True
    elif cfg.get("attention_bias"):
        attention["bias"] = True
    window = sliding_window(cfg, model_type, where)
    if window is not None:
        attention["sliding_window"] = int(window)
    mlp: dict[str, Any] = {"d_ff": int(require(cfg, "intermediate_size", where))}
    if cfg.get("mlp_bias"):
        mlp["bias"] = True
    return {
        "d_model": d_model,
        "n_layers": int(require(cfg, "num_hidden_layers", where)),
        "pattern": "transformer",
        "vocab_size": int(require(cfg, "vocab_size", where)),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "mixers": {"attention": attention},
        "ffns": {"mlp": mlp},
    }


def to_hf(decoder: nn.Module, model_type: str) -> dict[str, Any]:
    """A Llama/Mistral/Qwen2 config.json for a decoder whose layers are all attention + one SwiGLU."""
    where = f"export as {model_type}"
    if any(layer != "*-" for layer in decoder.layer_pattern):
        raise ChimeraError(
            f"{where}: the decoder's pattern {decoder.pattern!r} is not attention + MLP in every layer"
        )
    att, mlp = decoder.layers[0].mixer, decoder.layers[0].ffns[0]
    if att.pos_emb != "rope":
        raise unsupported(where, "attention without RoPE (pos_emb: none)")
    has_bias = att.o_proj.bias is not None
    qkv_bias = att.q_proj.bias is not None and not has_bias
    if model_type == "qwen2" and not qkv_bias:
        raise ChimeraError(f"{where}: Qwen2 has q/k/v biases and no o bias; this decoder's attention differs")
    if model_type in ("llama", "mistral") and qkv_bias:
        raise ChimeraError(f"{where}: q/k/v biases without an o bias are Qwen2's layout; export as qwen2")
    if model_type == "mistral" and (has_bias or mlp.gate_proj.bias is not None):
        raise unsupported(where, "Mistral with biases")
    if model_type == "qwen2" and mlp.gate_proj.bias is not None:
        raise unsupported(where, "Qwen2 with MLP biases")
    if att.sliding_window is not None and model_type == "llama":
        raise ChimeraError(f"{where}: Llama has no sliding window; export as mistral")
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type]],
        "hidden_size": decoder.d_model,
        "intermediate_size": mlp.down_proj.in_features,
        "num_hidden_layers": len(decoder.layers),
        "num_attention_heads": att.n_heads,
        "num_key_value_heads": att.n_kv_heads,
        "head_dim": att.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": decoder.final_norm.eps,
        "vocab_size": decoder.vocab_size,
        "tie_word_embeddings": decoder.lm_head.weight is decoder.embed_tokens.weight,
        "rope_parameters": rope_to_config(att),
        "max_position_embeddings": 32768,
    }
    if model_type == "llama":
        cfg |= {"attention_bias": has_bias, "mlp_bias": mlp.gate_proj.bias is not None}
    elif model_type == "mistral":
        cfg["sliding_window"] = att.sliding_window
    else:
        cfg |= {"use_sliding_window": att.sliding_window is not None, "sliding_window": att.sliding_window}
        if att.sliding_window is not None:
            cfg["max_window_layers"] = 0
    return cfg


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    base_prefix="model.",
    keymap=KEYMAP,
    to_decoder=to_decoder,
    to_hf=to_hf,
    architectures=ARCHITECTURES,
)
