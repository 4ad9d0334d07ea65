"""The run plan: stage sections validated like the top level, typed values, run identity, plugins next to
the experiment, constructor errors named by file and key; all before anything is written."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from toolkit import registry
from toolkit.cli import main
from toolkit.config import run_name
from toolkit.errors import ChimeraError
from toolkit.plan import load_plan


def _staged(tiny_experiment: Path, stage: dict) -> Path:
    cfg = yaml.safe_load(tiny_experiment.read_text())
    cfg["stages"] = [{"name": "align", "trainable": ["connector.*"]}, {"name": "instruct", **stage}]
    path = tiny_experiment.with_name("staged.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "stage, key",
    [
        ({"optim": {"lrr": 1}}, "optim.lrr: unknown key (did you mean 'lr'?)"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number > 0"),
        ({"trainer": {"max_stepz": 3}}, "trainer.max_stepz: not an argument of lightning.Trainer"),
        ({"trainer": {"max_steps": -5}}, "trainer.max_steps: expected an integer >= 1"),
        ({"data": {"batch_size": 0}}, "data.batch_size: expected an integer >= 1"),
        ({"data": {"train": {"name": "synthetic_shapes", "sise": 3}}}, "data.train.sise: unknown argument"),
        ({"model": {"pooler": {"name": "pool2d", "strid": 2}}}, "model.pooler.strid: unknown argument"),
    ],
)
def test_a_typo_in_a_stage_exits_2_naming_the_stage_the_file_and_the_key(tiny_experiment, capsys, stage, key):
    path = _staged(tiny_experiment, stage)
    assert main(["describe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and "stages[1] (instruct)" in err and key in err, err


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_steps=abc", "trainer.max_steps: expected an integer >= 1, got 'abc'"),
        ("trainer.max_steps=-5", "trainer.max_steps: expected an integer >= 1"),
        ("seed=abc", "seed: expected an integer >= 0"),
        ("optim.lr=fast", "optim.lr: expected a number > 0"),
        ("optim.lr=-1", "optim.lr: expected a number > 0"),
        ("optim.betas=[0.9]", "optim.betas: expected two numbers in [0, 1)"),
        ("data.num_workers=-1", "data.num_workers: expected an integer >= 0"),
        ("checkpoint.keep=abc", "checkpoint.keep: expected an integer >= -1"),
        ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps: expected an integer >= 1"),
        ("trainer.precision=bf17", "trainer.precision: expected one of"),
        ("strategy.name=fsdq", "strategy.name: expected one of auto, ddp, fsdp"),
        ("name=..", "name: expected a run name"),
        ("name=/some/dir", "name: expected a run name"),
        ("model.decoder.d_model=abc", "model.decoder.d_model: expected int for decoder 'hybrid'"),
        ("model.pooler.stride=2.5", "model.pooler.stride: expected int for pooler 'pool2d'"),
    ],
)
def test_bad_values_exit_2_before_anything_is_written(tiny_experiment, tmp_path, capsys, override, message):
    assert main(["train", str(tiny_experiment), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "command line" in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_constructor_error_names_the_file_and_the_key(tiny_experiment, capsys):
    """The model is built on the meta device while planning, so a component's own checks speak up first."""
    cfg = yaml.safe_load(tiny_experiment.read_text())
    cfg["model"]["decoder"]["pattern"] = "hybrid_1_1"
    cfg["model"]["decoder"]["ssm"] = "mamba2"
    cfg["model"]["decoder"]["mixers"]["mamba2"] = {"headdim": 7}  # d_inner 64 is not a multiple of 7
    tiny_experiment.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ChimeraError) as info:
        load_plan(tiny_experiment)
    assert str(tiny_experiment) in str(info.value) and "model.decoder" in str(info.value)


def test_run_identity_uses_full_keys_and_ignores_order():
    path = Path("experiments/quickstart.yaml")
    a = run_name(path, ["data.train.size=400"])
    b = run_name(path, ["data.val.size=400"])
    assert a != b and "data.train.size=400" in a
    assert run_name(path, ["optim.lr=0.001", "seed=1"]) == run_name(path, ["seed=1", "optim.lr=1e-3"])
    assert run_name(path, []) == "quickstart"
    unsafe = run_name(path, ["tracking.tags.note=a/b"])
    assert "/" not in unsafe and unsafe != run_name(path, ["tracking.tags.note=a_b"])
    long = run_name(path, [f"tracking.tags.t{i}=value{i}" for i in range(30)])
    assert len(long) <= 120


def test_plan_resolves_stages_and_run_folder(tiny_experiment, tmp_path):
    plan = load_plan(_staged(tiny_experiment, {"optim": {"lr": 0.5}}))
    assert plan.staged and [s.name for s in plan.stages] == ["align", "instruct"]
    assert plan.stages[1].cfg.optim.lr == 0.5 and plan.stages[0].cfg.optim.lr != 0.5
    assert plan.run_dir == tmp_path / "runs" / "staged" and plan.stages[1].run_dir.name == "stage2_instruct"
    assert plan.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    plain = load_plan(tiny_experiment, ["seed=3"])
    assert not plain.staged and len(plain.stages) == 1 and plain.stages[0].run_dir == plain.run_dir
    assert plain.name == "tiny-seed=3" and plain.tags["chimera.overrides"] == "seed=3"


def test_plugins_next_to_the_experiment_are_importable(tmp_path, tiny_experiment, monkeypatch, capsys):
    (tmp_path / "my_connectors.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from toolkit.registry import register

            @register("connector", "plugin_linear")
            class PluginLinear(nn.Linear):
                '''A connector from a plugin module next to the experiment.'''
                def __init__(self, in_dim: int, out_dim: int):
                    super().__init__(in_dim, out_dim)
            """
        )
    )
    cfg = yaml.safe_load(tiny_experiment.read_text())
    cfg["plugins"] = ["my_connectors"]
    cfg["model"]["connector"] = {"name": "plugin_linear"}
    tiny_experiment.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir("/")  # not the working directory: found next to the experiment file
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(registry._REGISTRY["connector"], "plugin_linear", raising=False)
    monkeypatch.delitem(sys.modules, "my_connectors", raising=False)
    assert main(["describe", str(tiny_experiment)]) == 0
    registry._REGISTRY["connector"].pop("plugin_linear")  # other tests see the built-ins only
    assert "plugin_linear" in capsys.readouterr().out
    cfg["plugins"] = ["no_such_plugin_module"]
    tiny_experiment.write_text(yaml.safe_dump(cfg))
    assert main(["describe", str(tiny_experiment)]) == 2
    err = capsys.readouterr().err
    assert "cannot import plugin module 'no_such_plugin_module'" in err and str(tmp_path) in err


def test_debug_works_before_and_after_the_command(tiny_experiment):
    for argv in (
        ["--debug", "describe", str(tiny_experiment), "seed=x"],
        ["describe", str(tiny_experiment), "seed=x", "--debug"],
    ):
        with pytest.raises(ChimeraError, match="seed: expected an integer"):
            main(argv)


def test_offline_pretrained_weights_fail_at_once_with_what_to_do(tiny_experiment, capsys, monkeypatch):
    """Fails at config time: timm is never asked to build (and so never retries a download)."""
    import timm

    def no_build(*args, **kwargs):
        raise AssertionError("timm.create_model was called")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_experiment.parent / "empty_hub_cache"))
    monkeypatch.setattr(timm, "create_model", no_build)
    override = "model.encoder.model_name=vit_base_patch16_clip_224.openai"
    assert main(["train", str(tiny_experiment), override, "model.encoder.pretrained=true"]) == 2
    err = capsys.readouterr().err
    assert "not in the local cache" in err and "checkpoint_path" in err and "model.encoder" in err


def test_training_the_9b_reference_on_a_24gb_host_exits_2_with_the_memory_it_needs(
    monkeypatch, capsys, tmp_path
):
    """The memory plan runs in the preflight: nothing of the model is allocated (the build is never reached)."""
    from tests.conftest import ROOT
    from toolkit import assemble, memory

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(memory, "available_host_bytes", lambda: 24e9)
    monkeypatch.setattr(assemble, "build_parts", no_build)
    reference = str(ROOT / "experiments" / "longllava" / "reference.yaml")
    assert main(["train", reference, "trainer.accelerator=cpu", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "24.00 GB available" in err and "needs about" in err and "activation_checkpointing" in err
