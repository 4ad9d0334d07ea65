"""The hybrid decoder: pattern grammar, presets, attention, cached decoding and parameter parity with Jamba."""

from __future__ import annotations

import pytest
import torch

from components.decoders.hybrid import HybridDecoder
from components.decoders.pattern import PatternError, even_spread, parse_layers, resolve
from components.mixers.attention import Attention
from toolkit.errors import ChimeraError
from toolkit.registry import build

MIX = {"*": "attention", "m": "mamba", "M": "mamba2"}
FFN = {"-": "mlp", "E": "moe"}
MEGATRON_8B = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


def test_presets():
    assert "".join(resolve("transformer", 3, MIX, FFN)) == "*-*-*-"
    assert "".join(resolve("mamba", 2, MIX, FFN)) == "m-m-"
    assert "".join(resolve("mamba2", 2, MIX, FFN)) == "M-M-"
    jamba = resolve("jamba", 32, MIX, FFN)
    assert [i for i, layer in enumerate(jamba) if layer[0] == "*"] == [4, 12, 20, 28]
    assert all((layer[1] == "E") == (i % 2 == 1) for i, layer in enumerate(jamba))


@pytest.mark.parametrize(
    ("n", "attn", "ssm", "expected"),
    [
        (32, 1, 7, [6, 13, 20, 26]),  # round(32/8) = 4 attention layers, 28 SSM layers in runs 6,6,6,5,5
        (8, 1, 3, [2, 5]),  # 2 attention, runs of 2
        (4, 1, 0, [0, 1, 2, 3]),  # 1:0 is a Transformer
        (4, 0, 1, []),  # 0:1 is pure SSM
    ],
)
def test_even_spread(n, attn, ssm, expected):
    layers = even_spread(n, attn, ssm)
    assert [i for i, a in enumerate(layers) if a] == expected
    runs = "".join("*" if a else "m" for a in layers).split("*")
    assert max(map(len, runs)) - min(map(len, runs)) <= 1  # SSM runs of equal length (within one)


def test_megatron_explicit_string():
    layers = parse_layers(MEGATRON_8B, MIX, FFN)
    flat = "".join(layers)
    assert flat == MEGATRON_8B
    assert flat.count("*") == 4 and flat.count("M") == 24 and flat.count("-") == 28
    assert resolve(MEGATRON_8B, None, MIX, FFN) == layers
    with pytest.raises(PatternError, match="has 28 layers but n_layers is 30"):
        resolve(MEGATRON_8B, 30, MIX, FFN)
    assert parse_layers("m- | *E", MIX, FFN) == ["m-", "*E"]  # spaces and bars group long strings


def test_bad_letter_names_position_and_allowed():
    with pytest.raises(
        PatternError, match=r"'x' at position 3 is not a layer letter; allowed: '\*' attention, 'm' mamba"
    ):
        parse_layers("m-*x", MIX, FFN)


def test_decoder_validate_config_catches_bad_pattern_without_building():
    with pytest.raises(ChimeraError, match="position 1"):
        HybridDecoder.validate_config({"pattern": "mQ", "d_model": 8}, "model.decoder")


def test_decoder_builds_registered_parts_per_letter():
    dec = build(
        "decoder",
        {
            "name": "hybrid",
            "d_model": 32,
            "n_layers": 4,
            "pattern": "jamba",
            "vocab_size": 50,
            "mixers": {"attention": {"n_heads": 4}, "mamba": {"d_state": 4}},
            "ffns": {"moe": {"d_ff": 48, "n_experts": 4, "top_k": 2}},
        },
    )
    kinds = [(type(layer.mixer).__name__, [type(f).__name__ for f in layer.ffns]) for layer in dec.layers]
    assert kinds[0][0] == "Mamba" and kinds[1][1] == ["MoE"] and kinds[0][1] == ["SwiGLU"]
    assert dec.pattern == "m-mEm-mE"
    x = torch.randn(2, 5, 32)
    assert dec(x).shape == (2, 5, 32)
    dec.train()
    dec(x)
    assert dec.aux_loss() is not None and dec.aux_loss() > 0


def _hybrid(pattern: str, n_layers: int | None) -> HybridDecoder:
    return build(
        "decoder",
        {
            "name": "hybrid",
            "d_model": 32,
            "n_layers": n_layers,
            "pattern": pattern,
            "vocab_size": 40,
            "mixers": {
                "attention": {"n_heads": 4, "n_kv_heads": 2},
                "mamba": {"d_state": 8},
                "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 4},
            },
            "ffns": {"moe": {"d_ff": 40, "n_experts": 3, "top_k": 2}, "mlp": {"d_ff": 48}},
        },
    ).eval()


@pytest.mark.parametrize(("pattern", "n_layers"), [("transformer", 2), ("jamba", 6), ("m-M-*E", None)])
def test_step_by_step_decode_equals_full_forward(pattern, n_layers):
    torch.manual_seed(0)
    dec = _hybrid(pattern, n_layers)
    ids = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        full = dec.logits(dec(dec.embed(ids)))  # [B, T, V]
        cache = dec.allocate_cache(2, 16)
        pre = dec.logits(dec(dec.embed(ids[:, :6]), cache=cache))  # prefill 6 tokens
        steps = [dec.logits(dec(dec.embed(ids[:, t : t + 1]), cache=cache)) for t in range(6, 11)]
    stepped = torch.cat([pre, *steps], dim=1)
    assert (stepped - full).abs().max() < 1e-4


def repeated_heads_attention(att: Attention, x: torch.Tensor) -> torch.Tensor:
    """Causal attention written out with every query head given its own copy of its K/V head (query head h reads
    K/V head h // (n_heads / n_kv_heads)), rotate-half RoPE at positions / rope_scaling, an explicit softmax."""
    B, L, _ = x.shape
    H, Hkv, D = att.n_heads, att.n_kv_heads, att.head_dim
    q = (x @ att.q_proj.weight.T).view(B, L, H, D)
    k = (x @ att.k_proj.weight.T).view(B, L, Hkv, D)
    v = (x @ att.v_proj.weight.T).view(B, L, Hkv, D)
    if att.pos_emb == "rope":
        inv_freq = att.rope_theta ** (-torch.arange(0, D, 2).float() / D)  # [D/2]
        angles = (torch.arange(L).float() / att.rope_scaling)[:, None] * inv_freq  # [L, D/2]
        cos, sin = angles.cos().repeat(1, 2)[:, None], angles.sin().repeat(1, 2)[:, None]  # [L, 1, D]

        def rotate(t):
            return t * cos + torch.cat([-t[..., D // 2 :], t[..., : D // 2]], dim=-1) * sin

        q, k = rotate(q), rotate(k)
    group = H // Hkv
    k = torch.stack([k[:, :, h // group] for h in range(H)], dim=2)  # [B, L, H, D]
    v = torch.stack([v[:, :, h // group] for h in range(H)], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return y.reshape(B, L, H * D) @ att.o_proj.weight.T


def test_attention_gqa_matches_repeated_heads_and_rope_scaling_changes_positions():
    torch.manual_seed(0)
    att = Attention(32, n_heads=4, n_kv_heads=2)
    x = torch.randn(1, 7, 32)
    y = att(x)
    assert y.shape == x.shape
    with torch.no_grad():
        assert (y - repeated_heads_attention(att, x)).abs().max() <= 1e-5
        # the same weights as full multi-head attention: each K/V head's rows copied for its query heads
        mha = Attention(32, n_heads=4, n_kv_heads=4)
        mha.load_state_dict(att.state_dict() | {
            name: att.state_dict()[name].view(2, 1, 8, 32).expand(2, 2, 8, 32).reshape(32, 32)
            for name in ("k_proj.weight", "v_proj.weight")
        })  # fmt: skip
        assert (mha(x) - y).abs().max() <= 1e-5
    # causal: the first output does not depend on later inputs
    x2 = x.clone()
    x2[:, 3:] += 1
    assert torch.allclose(att(x2)[:, :3], y[:, :3], atol=1e-6)
    scaled = Attention(32, n_heads=4, n_kv_heads=2, rope_scaling=2.0)
    scaled.load_state_dict(att.state_dict())
    assert not torch.allclose(scaled(x), y)
    with torch.no_grad():
        assert (scaled(x) - repeated_heads_attention(scaled, x)).abs().max() <= 1e-5
    nopos = Attention(32, n_heads=4, pos_emb="none")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Attention(32, n_heads=4, n_kv_heads=3)
    assert nopos(x).shape == x.shape


def test_reference_decoder_matches_transformers_jamba_param_count():
    """LongLLaVA's 9B decoder (Jamba layout, one expert) on the meta device vs transformers' JambaForCausalLM."""
    from transformers import JambaConfig, JambaForCausalLM

    from tests.conftest import ROOT
    from toolkit.config import load_config

    cfg = load_config(ROOT / "experiments" / "longllava" / "reference.yaml")
    node = dict(cfg.model.decoder)
    with torch.device("meta"):
        ours = build("decoder", node, "model.decoder")
        hf = JambaForCausalLM(
            JambaConfig(
                vocab_size=65536,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                num_experts=1,
                num_experts_per_tok=1,
                expert_layer_period=2,
                expert_layer_offset=1,
                attn_layer_period=8,
                attn_layer_offset=4,
                mamba_d_state=16,
                mamba_d_conv=4,
                mamba_expand=2,
                mamba_dt_rank=256,
                tie_word_embeddings=False,
                use_mamba_kernels=False,
            )
        )
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf, (n_ours, n_hf)
    assert 9.0e9 < n_ours < 9.6e9
