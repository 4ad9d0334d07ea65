"""Any part from a weights file (the per-part ``init`` key): LLaVA-1.5's projector, a LongLLaVA-style checkpoint
(Jamba + ``mm_projector``), transformers' ``LlavaForConditionalGeneration`` loaded whole, and the VLM export."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from toolkit.convert import (
    export_vlm,
    load_model_init,
    load_part_init,
    prepare_node,
    split_init,
)
from toolkit.errors import ChimeraError
from toolkit.registry import build


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _mlp(in_dim=16, out_dim=32):
    return build("connector", {"name": "mlp", "depth": 2}, "model.connector", in_dim=in_dim, out_dim=out_dim)


# -- config keys -----------------------------------------------------------------------------------------------
def test_init_is_split_off_and_validated(tmp_path):
    node, init = split_init({"name": "mlp", "depth": 2, "init": {"path": "x.bin", "layout": "llava"}})
    assert node == {"name": "mlp", "depth": 2} and init == {"path": "x.bin", "layout": "llava"}
    assert split_init({"name": "mlp"}) == ({"name": "mlp"}, None)
    assert prepare_node("connector", "mlp", "model.connector") == ("mlp", None)
    with pytest.raises(ChimeraError, match=r"model.connector.init.paht: unknown; accepted: hf, path"):
        prepare_node("connector", {"name": "mlp", "init": {"paht": "x"}}, "model.connector")
    with pytest.raises(ChimeraError, match="only the decoder is built from a Hugging Face model"):
        prepare_node("connector", {"name": "mlp", "init": {"hf": "x"}}, "model.connector")
    with pytest.raises(ChimeraError, match="layout: 'llava2' unknown"):
        prepare_node(
            "connector", {"name": "mlp", "init": {"path": "x", "layout": "llava2"}}, "model.connector"
        )


def test_decoder_node_comes_from_config_json_and_user_keys_merge(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    node, init = prepare_node(
        "decoder", {"init": {"hf": str(tmp_path / "hf")}}, "model.decoder", vocab_size=70
    )
    assert init == {"hf": str(tmp_path / "hf")}
    assert node["name"] == "hybrid" and node["d_model"] == 32 and node["n_layers"] == 2
    assert node["vocab_size"] == 70  # grown for the tokenizer's added tokens
    node, _ = prepare_node(
        "decoder",
        {"init": {"hf": str(tmp_path / "hf")}, "mixers": {"attention": {"sliding_window": 8}}},
        "model.decoder",
    )
    assert node["mixers"]["attention"] == {
        "n_heads": 4,
        "n_kv_heads": 4,
        "pos_emb": "rope",
        "rope_theta": 10000.0,
        "sliding_window": 8,
    }
    with pytest.raises(
        ChimeraError, match=r"model.decoder.d_model: 64 contradicts the checkpoint's config.json"
    ):
        prepare_node("decoder", {"init": {"hf": str(tmp_path / "hf")}, "d_model": 64}, "model.decoder")


# -- LLaVA-1.5 projector ---------------------------------------------------------------------------------------
def test_llava15_mm_projector_bin_into_the_mlp_connector(tmp_path):
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    state = {f"model.mm_projector.{k}": v for k, v in ref.state_dict().items()}
    torch.save(state, tmp_path / "mm_projector.bin")  # what LLaVA's stage 1 writes
    x = torch.randn(2, 5, 16)
    for init in (
        {"path": str(tmp_path / "mm_projector.bin"), "layout": "llava"},
        {"path": str(tmp_path / "mm_projector.bin"), "keys": {"model.mm_projector.": "proj."}},
    ):
        connector = _mlp()
        load_part_init(connector, "connector", init)
        with torch.no_grad():
            assert torch.equal(connector(x), ref(x))
    # a wrong prefix names what the file has
    with pytest.raises(
        ChimeraError, match="no key of .* starts with 'mm_proj.'.*model.mm_projector.0.weight"
    ):
        load_part_init(
            _mlp(), "connector", {"path": str(tmp_path / "mm_projector.bin"), "prefix": "mm_proj."}
        )
    # a projector of another shape is named, with both shapes
    with pytest.raises(
        ChimeraError, match=r"mis-shaped: proj.0.weight \(checkpoint \[32, 16\] .* model \[32, 8\]\)"
    ):
        load_part_init(
            _mlp(in_dim=8), "connector", {"path": str(tmp_path / "mm_projector.bin"), "layout": "llava"}
        )


# -- LongLLaVA: Jamba + mm_projector in one directory ---------------------------------------------------------
def test_longllava_style_checkpoint_gives_decoder_and_connector(tmp_path):
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(0)
    cfg = JambaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=4,
    )
    jamba = _perturb(JambaForCausalLM(cfg))
    jamba.save_pretrained(tmp_path / "longllava")
    projector = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    file = tmp_path / "longllava" / "model.safetensors"
    state = safetensors.torch.load_file(str(file))
    state |= {f"model.mm_projector.{k}": v.contiguous() for k, v in projector.state_dict().items()}
    safetensors.torch.save_file(state, str(file), metadata={"format": "pt"})
    config = json.loads((tmp_path / "longllava" / "config.json").read_text())
    config |= {"model_type": "llava_jamba", "architectures": ["LlavaJambaForCausalLM"], "mm_hidden_size": 16}
    (tmp_path / "longllava" / "config.json").write_text(json.dumps(config))

    path = str(tmp_path / "longllava")
    node, init = prepare_node("decoder", {"init": {"hf": path}}, "model.decoder")
    assert node["pattern"] == "m-*-" and node["mixers"]["mamba"]["inner_norms"]
    with torch.device("meta"):
        decoder = build("decoder", node, "model.decoder")
    load_part_init(decoder, "decoder", init)  # the projector's keys belong to another part: skipped
    connector = _mlp()
    load_part_init(connector, "connector", {"path": path, "layout": "llava"})
    ids = torch.randint(0, 64, (1, 9))
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        assert (decoder.logits(decoder(decoder.embed(ids))) - jamba(ids).logits).abs().max() <= 1e-4
        assert torch.equal(connector(x), projector(x))


# -- transformers' LlavaForConditionalGeneration, whole -------------------------------------------------------
def _tiny_llava(path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=90,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = _perturb(LlavaForConditionalGeneration(cfg))
    model.save_pretrained(path)
    return model


def test_transformers_llava_loads_whole_with_the_same_logits(tmp_path):
    from toolkit.model import MultimodalModel

    hf = _tiny_llava(tmp_path / "llava")
    path = str(tmp_path / "llava")
    encoder = build(
        "encoder",
        {
            "name": "timm_vit",
            "model_name": "vit_base_patch16_clip_224",
            "img_size": 32,
            "select_layer": -2,
            "model_args": {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0,
                           "act_layer": "quick_gelu"},
        },
        "model.encoder",
    )  # fmt: skip
    pooler = build(
        "pooler", {"name": "identity"}, "model.pooler", grid=encoder.grid, n_tokens=encoder.num_tokens
    )
    node, _ = prepare_node("decoder", {"init": {"hf": path}}, "model.decoder")
    with torch.device("meta"):
        decoder = build("decoder", node, "model.decoder")
    connector = build("connector", {"name": "mlp"}, "model.connector", in_dim=32, out_dim=decoder.d_model)
    model = MultimodalModel(encoder, pooler, connector, decoder, image_token_id=90).eval()
    loaded = load_model_init(model, {"path": path, "layout": "llava_hf"})
    assert loaded == ["encoder", "connector", "decoder"]

    images = torch.rand(2, 3, 32, 32)
    pixels = (images - encoder.mean) / encoder.std  # transformers takes normalised pixels
    ids = torch.tensor([[1, 5, *[90] * 16, 7, 8], [1, 9, *[90] * 16, 11, 12]])
    with torch.no_grad():
        feats = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert (encoder(images) - feats).abs().max() <= 1e-4
        assert (model.encode_images(images) - hf.model.multi_modal_projector(feats)).abs().max() <= 1e-4
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
        ours = model(ids, images)
        assert ours.abs().max() > 0.1
        assert (ours - theirs).abs().max() <= 1e-4


def test_strict_init_names_missing_keys(tmp_path):
    torch.save({"model.mm_projector.0.weight": torch.zeros(32, 16)}, tmp_path / "half.bin")
    with pytest.raises(ChimeraError, match=r"3 missing: proj.0.bias, proj.2.weight, proj.2.bias"):
        load_part_init(_mlp(), "connector", {"path": str(tmp_path / "half.bin"), "layout": "llava"})
    connector = _mlp()
    load_part_init(
        connector, "connector", {"path": str(tmp_path / "half.bin"), "layout": "llava", "strict": False}
    )
    assert torch.equal(connector.proj[0].weight, torch.zeros(32, 16))


# -- the whole VLM out and back in -----------------------------------------------------------------------------
def test_export_vlm_writes_safetensors_and_the_yaml(tmp_path):
    from tests.conftest import TINY_MODEL
    from toolkit.checkpointing import load_weights
    from toolkit.model import build_model

    torch.manual_seed(0)
    model = build_model(TINY_MODEL, vocab_size=40, image_token_id=4).eval()
    files = export_vlm(model, "model: {}\n", str(tmp_path / "vlm"))
    assert files == ["model.safetensors", "config.yaml"]
    assert (tmp_path / "vlm" / "config.yaml").read_text() == "model: {}\n"
    torch.manual_seed(1)
    fresh = build_model(TINY_MODEL, vocab_size=40, image_token_id=4).eval()
    load_weights(fresh, tmp_path / "vlm" / "model.safetensors")
    ids = torch.randint(5, 40, (1, 6))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    other = build_model(TINY_MODEL, vocab_size=40, image_token_id=4)
    load_part_init(other, "connector", {"path": str(tmp_path / "vlm"), "layout": "chimera"})
    assert torch.equal(other.connector.proj[0].weight, model.connector.proj[0].weight)
    for init, parts in (
        ({"path": str(tmp_path / "vlm"), "layout": "chimera"}, ["encoder", "connector", "decoder"]),
        ({"path": str(tmp_path / "vlm" / "model.safetensors")}, [""]),  # raw: the whole model as saved
    ):
        torch.manual_seed(2)
        other = build_model(TINY_MODEL, vocab_size=40, image_token_id=4).eval()
        assert load_model_init(other, init) == parts
        with torch.no_grad():
            assert torch.equal(other(ids), model(ids))
