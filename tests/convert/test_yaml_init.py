"""A pretrained decoder through the experiment YAML: `model.decoder: {init: {hf: DIR}}` plans (shape from
config.json, tokenizer from the same folder), builds with the checkpoint's weights and matches transformers."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import TINY_MODEL
from tests.convert.test_hf_decoder import VOCAB, _llama, _save_tokenizer, save_random
from toolkit.errors import ChimeraError


def _experiment(tmp_path, decoder: dict) -> str:
    cfg = {
        "model": {**TINY_MODEL, "decoder": decoder},
        "data": {"train": {"name": "synthetic_shapes", "size": 16}, "val": None},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_decoder_from_a_hugging_face_folder_through_yaml_matches_transformers(tmp_path):
    from toolkit.assemble import build_model
    from toolkit.plan import load_plan

    hf = save_random(_llama, tmp_path / "hf").eval()
    _save_tokenizer(tmp_path / "hf")
    plan = load_plan(_experiment(tmp_path, {"init": {"hf": str(tmp_path / "hf")}}))
    assert plan.tokenizer.convert_tokens_to_ids("w7") == 11  # the checkpoint's own tokenizer
    model = build_model(plan.cfg, plan.tokenizer).eval()
    assert model.decoder.d_model == 32 and len(model.decoder.layers) == 2  # written by no one but config.json
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ours = model.decoder.logits(model.decoder(model.decoder.embed(ids)))[..., :VOCAB]
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_init_keys_are_checked_with_the_config(tmp_path):
    from toolkit.plan import load_plan

    with pytest.raises(ChimeraError, match=r"model.decoder.init.pth: unknown"):
        load_plan(_experiment(tmp_path, {**TINY_MODEL["decoder"], "init": {"pth": "x"}}))


@pytest.mark.slow
def test_chimera_export_writes_a_trained_run_that_transformers_loads_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from toolkit.assemble import build_model
    from toolkit.checkpointing import load_weights
    from toolkit.cli import main
    from toolkit.plan import load_plan

    save_random(_llama, tmp_path / "hf")
    _save_tokenizer(tmp_path / "hf")
    config = _experiment(tmp_path, {"init": {"hf": str(tmp_path / "hf")}})
    overrides = ["name=tuned", "trainer.max_steps=2", "trainer.accelerator=cpu", "data.batch_size=4"]
    assert main(["train", config, *overrides]) == 0
    run = tmp_path / "runs" / "tuned"
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "hf"]) == 0
    assert main(["export", str(run), str(tmp_path / "vlm"), "--format", "vlm"]) == 0
    assert (tmp_path / "vlm" / "model.safetensors").is_file() and (tmp_path / "vlm" / "config.yaml").is_file()

    plan = load_plan(config, overrides)
    model = build_model(plan.cfg, plan.tokenizer).eval()
    load_weights(model, run / "final.safetensors")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        ours = model.decoder.logits(model.decoder(model.decoder.embed(ids)))
        theirs = exported(ids).logits
    torch.testing.assert_close(theirs, ours[..., : theirs.shape[-1]], rtol=0, atol=1e-4)
