"""Decoders from Hugging Face checkpoints and back: tiny random transformers models saved to tmp_path, loaded
through ``toolkit.convert``, compared with transformers (logits, greedy tokens), exported and reloaded."""

from __future__ import annotations

import json

import pytest
import torch

from toolkit.convert import decoder_from_hf, decoder_kwargs, export_hf
from toolkit.errors import ChimeraError

VOCAB = 96


def _jamba():
    from transformers import JambaConfig, JambaForCausalLM

    cfg = JambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=4,
        pad_token_id=0,
    )
    return JambaForCausalLM(cfg)


def _llama(**rope):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = rope or {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters=rope,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def _llama3():
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 500000.0,
    }
    return _llama(**rope)


def _qwen2(**extra):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **extra,
    )
    return Qwen2ForCausalLM(cfg)


def _qwen2_yarn():
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 10000.0}
    return _qwen2(rope_parameters=rope, max_position_embeddings=32)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        sliding_window=5,
    )
    return MistralForCausalLM(cfg)


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8))


def _mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    cfg = Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        num_heads=8,
        head_dim=8,
        n_groups=2,
    )
    return Mamba2ForCausalLM(cfg)


FAMILIES = {
    "jamba": (_jamba, "m-*Em-*E", "jamba"),
    "llama_linear_rope": (_llama, "*-*-", "llama"),
    "llama3_rope": (_llama3, "*-*-", "llama"),
    "qwen2": (_qwen2, "*-*-", "qwen2"),
    "qwen2_yarn": (_qwen2_yarn, "*-*-", "qwen2"),
    "mistral_sliding_window": (_mistral, "*-*-", "mistral"),
    "mamba": (_mamba, "mm", "mamba"),
    "mamba2": (_mamba2, "MM", "mamba2"),
}


def save_random(make, path):
    """A tiny transformers model with weights spread enough that greedy tokens are well separated."""
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return model.eval()


def greedy(decoder, ids, n):
    """Greedy decoding through the decoder's cache: one prefill, then one token per step."""
    cache = decoder.allocate_cache(ids.shape[0], ids.shape[1] + n)
    logits = decoder.logits(decoder(decoder.embed(ids), cache=cache))[:, -1]
    out = [ids]
    for _ in range(n):
        token = logits.argmax(-1, keepdim=True)
        out.append(token)
        logits = decoder.logits(decoder(decoder.embed(token), cache=cache))[:, -1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_generation_and_export_match_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    make, pattern, model_type = FAMILIES[family]
    hf = save_random(make, tmp_path / "hf")
    decoder = decoder_from_hf(str(tmp_path / "hf")).eval()
    assert decoder.pattern == pattern
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        ours = decoder.logits(decoder(decoder.embed(ids)))
        theirs = hf(ids).logits
        assert ours.abs().max() > 0.1  # not a degenerate comparison
        assert (ours - theirs).abs().max() <= 1e-4
        prompt = ids[:, :7]
        hf.generation_config.eos_token_id = None  # ten tokens, whatever they are (no EOS stop or suppression)
        expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert expected.shape == (2, 17)
        assert torch.equal(greedy(decoder, prompt, 10), expected)

    cfg = export_hf(decoder, None, str(tmp_path / "out"))
    assert cfg["model_type"] == model_type
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(ids).logits - ours).abs().max() <= 1e-4


def test_jamba_fused_experts_layout_loads_too(tmp_path):
    """transformers 5 keeps experts fused in memory; a checkpoint written in that layout loads the same."""
    import safetensors.torch

    hf = save_random(_jamba, tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # fused: experts.gate_up_proj [E, 2F, D]
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in state
    safetensors.torch.save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    decoder = decoder_from_hf(str(tmp_path / "hf")).eval()
    ids = torch.randint(1, VOCAB, (1, 9))
    with torch.no_grad():
        assert (decoder.logits(decoder(decoder.embed(ids))) - hf(ids).logits).abs().max() <= 1e-4


def test_sharded_checkpoint_and_kwargs(tmp_path):
    hf = save_random(_llama, tmp_path / "src")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    kwargs = decoder_kwargs(str(tmp_path / "hf"))
    assert kwargs["d_model"] == 32 and kwargs["mixers"]["attention"]["rope_scaling"] == 2.0
    assert kwargs["mixers"]["attention"]["n_kv_heads"] == 2 and kwargs["ffns"]["mlp"]["d_ff"] == 48
    decoder = decoder_from_hf(str(tmp_path / "hf"))
    ids = torch.randint(1, VOCAB, (1, 6))
    with torch.no_grad():
        assert (decoder.logits(decoder(decoder.embed(ids))) - hf(ids).logits).abs().max() <= 1e-4


def test_meta_default_device_reads_only_the_config(tmp_path):
    save_random(_llama, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()  # planning never touches the weights
    with torch.device("meta"):
        decoder = decoder_from_hf(str(tmp_path / "hf"), vocab_size=100)
    assert decoder.embed_tokens.weight.is_meta and decoder.vocab_size == 100


def test_loaded_parameters_keep_their_tags_and_ties(tmp_path):
    save_random(_mamba, tmp_path / "hf")
    decoder = decoder_from_hf(str(tmp_path / "hf"))
    assert decoder.lm_head.weight is decoder.embed_tokens.weight  # Mamba ties its head
    mixer = decoder.layers[0].mixer
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay  # optimizer groups still see them
    assert all(p.requires_grad and not p.is_meta for p in decoder.parameters())


# -- errors --------------------------------------------------------------------------------------------------
def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    import safetensors.torch

    save_random(_llama, tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    state = safetensors.torch.load_file(str(file))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    safetensors.torch.save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ChimeraError) as err:
        decoder_from_hf(str(tmp_path / "hf"))
    msg = str(err.value)
    assert "1 missing: layers.1.ffns.0.up_proj.weight" in msg
    assert "1 unexpected: model.layers.0.self_attn.extra.weight" in msg
    assert (
        "layers.0.mixer.k_proj.weight (checkpoint [8, 32] from model.layers.0.self_attn.k_proj.weight" in msg
    )


def test_unsupported_configs_fail_with_the_reason(tmp_path):
    save_random(_llama, tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}))
    with pytest.raises(ChimeraError, match="RoPE type 'longrope'"):
        decoder_kwargs(str(tmp_path / "hf"))
    cfg_file.write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    with pytest.raises(ChimeraError, match="model_type 'gpt2' is not supported"):
        decoder_kwargs(str(tmp_path / "hf"))
    with pytest.raises(ChimeraError, match="no config.json"):
        decoder_kwargs(str(tmp_path))


def test_export_refuses_what_the_family_cannot_say(tmp_path):
    from toolkit.registry import build

    decoder = build(
        "decoder",
        {
            "name": "hybrid",
            "d_model": 32,
            "pattern": "m-*-*-m-",
            "vocab_size": VOCAB,
            "mixers": {"attention": {"n_heads": 4, "pos_emb": "none"}, "mamba": {"inner_norms": True}},
        },
    )
    with pytest.raises(ChimeraError, match=r"attention layers \[1, 2\] are not every k-th layer"):
        export_hf(decoder, None, str(tmp_path / "x"))
    with pytest.raises(ChimeraError, match="is not Mamba-1 layers without FFNs"):
        export_hf(decoder, None, str(tmp_path / "x"), family="mamba")


# -- tokenizer and markup ------------------------------------------------------------------------------------
def _save_tokenizer(path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(VOCAB - 4))])
    }
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.save_pretrained(path)


@pytest.mark.parametrize("make", [_llama, _mamba], ids=["untied", "tied"])
def test_markup_tokens_grow_embedding_and_head_with_mean_rows(make, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.data import IMAGE, MARKUP_TOKENS, load_tokenizer

    hf = save_random(make, tmp_path / "hf")
    _save_tokenizer(tmp_path / "hf")
    tok = load_tokenizer(str(tmp_path / "hf"))  # the checkpoint's tokenizer + the image markup
    assert len(tok) == VOCAB + len(MARKUP_TOKENS)
    decoder = decoder_from_hf(str(tmp_path / "hf"), vocab_size=len(tok))
    assert decoder.vocab_size == len(tok) and decoder.embed_tokens.weight.shape[0] == len(tok)
    old_embed = hf.get_input_embeddings().weight
    old_head = hf.get_output_embeddings().weight
    with torch.no_grad():
        assert torch.equal(decoder.embed_tokens.weight[:VOCAB], old_embed)
        new = decoder.embed_tokens.weight[VOCAB:]
        assert torch.allclose(new, old_embed.mean(0).expand_as(new), atol=1e-6)
        assert torch.allclose(decoder.lm_head.weight[VOCAB:], old_head.mean(0).expand_as(new), atol=1e-6)
    assert (decoder.lm_head.weight is decoder.embed_tokens.weight) == hf.config.tie_word_embeddings
    ids = torch.randint(4, VOCAB, (1, 8))
    with torch.no_grad():  # the old vocabulary's logits are unchanged
        ours = decoder.logits(decoder(decoder.embed(ids)))
        assert (ours[..., :VOCAB] - hf(ids).logits).abs().max() <= 1e-4

    export_hf(decoder, tok, str(tmp_path / "out"))
    back_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(back_tok) == len(tok) and back_tok.convert_tokens_to_ids(IMAGE) == tok.convert_tokens_to_ids(
        IMAGE
    )
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.vocab_size == len(tok)
    with torch.no_grad():
        assert (back(ids).logits - ours).abs().max() <= 1e-4


# -- attention shape checks ----------------------------------------------------------------------------------
def test_attention_rejects_heads_that_do_not_split_d_model():
    from components.mixers.attention import Attention
    from toolkit.registry import build

    with pytest.raises(ValueError, match=r"d_model \(32\) does not split into n_heads \(64\) heads"):
        Attention(32, n_heads=64)
    with pytest.raises(ValueError, match=r"d_model \(30\) does not split into n_heads \(4\) heads: .* = 7.5"):
        Attention(30, n_heads=4)
    assert Attention(30, n_heads=4, head_dim=8).q_proj.out_features == 32  # explicit head_dim: any d_model
    with pytest.raises(ChimeraError, match=r"d_model \(16\) does not split into n_heads \(32\)"):
        build(
            "decoder",
            {"name": "hybrid", "d_model": 16, "n_layers": 1, "mixers": {"attention": {"n_heads": 32}}},
            "model.decoder",
        )


def test_paths_go_through_fsspec(tmp_path):
    """Read from and export to a non-local filesystem (fsspec's in-memory one stands in for s3:// or gs://)."""
    import fsspec

    hf = save_random(_qwen2, tmp_path / "hf")
    fs = fsspec.filesystem("memory")
    for file in (tmp_path / "hf").iterdir():
        fs.pipe(f"/chimera-test/hf/{file.name}", file.read_bytes())
    try:
        decoder = decoder_from_hf("memory://chimera-test/hf")
        ids = torch.randint(1, VOCAB, (1, 7))
        with torch.no_grad():
            ours = decoder.logits(decoder(decoder.embed(ids)))
            assert (ours - hf(ids).logits).abs().max() <= 1e-4
        export_hf(decoder, None, "memory://chimera-test/out", max_shard_size=20_000)
        assert fs.exists("/chimera-test/out/model.safetensors.index.json")  # sharded
        again = decoder_from_hf("memory://chimera-test/out")
        with torch.no_grad():
            assert torch.equal(again.logits(again(again.embed(ids))), ours)
    finally:
        fs.rm("/chimera-test", recursive=True)


def test_hf_tensors_streams_checked_tensors_for_a_meta_decoder(tmp_path):
    from toolkit.convert import hf_tensors

    hf = save_random(_mamba, tmp_path / "hf")
    with torch.device("meta"):
        decoder = decoder_from_hf(str(tmp_path / "hf"), vocab_size=VOCAB + 4)
    tensors = dict(hf_tensors(decoder, str(tmp_path / "hf")))
    assert set(tensors) == set(decoder.state_dict()) - {"lm_head.weight"}  # tied: written once
    assert tensors["embed_tokens.weight"].shape == (VOCAB + 4, 32)
    assert torch.equal(tensors["layers.1.mixer.A_log"], hf.backbone.layers[1].mixer.A_log.detach())
