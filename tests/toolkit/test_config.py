"""Config loading: base inheritance, overrides, component swaps, validation errors naming file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY_MODEL
from toolkit.config import load_config, merge
from toolkit.errors import ChimeraError


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


def test_merge_replaces_a_component_whose_name_changes():
    base = {"model": {"connector": {"name": "mlp", "depth": 3}}, "x": {"a": 1, "b": 2}, "name": "a"}
    swapped = merge(base, {"model": {"connector": {"name": "linear"}}})
    assert swapped == {"model": {"connector": {"name": "linear"}}, "x": {"a": 1, "b": 2}, "name": "a"}
    assert merge(base, {"model": {"connector": {"depth": 4}}})["model"]["connector"] == {
        "name": "mlp",
        "depth": 4,
    }
    assert merge(base, {"x": {"b": 3}})["x"] == {"a": 1, "b": 3}
    # only component nodes follow the rule: a run name or a strategy name merges like any value
    assert merge(base, {"name": "b"}) == {**base, "name": "b"}
    strategy = merge(
        {"strategy": {"name": "auto", "activation_checkpointing": False}}, {"strategy": {"name": "fsdp"}}
    )
    assert strategy["strategy"] == {"name": "fsdp", "activation_checkpointing": False}


def test_base_inheritance_relative_paths_and_order(tmp_path):
    write(tmp_path / "base" / "a.yaml", {"seed": 1, "optim": {"lr": 0.1, "warmup_steps": 5}})
    write(tmp_path / "base" / "b.yaml", {"seed": 2, "model": TINY_MODEL})
    exp = write(
        tmp_path / "exp" / "e.yaml", {"base": ["../base/a.yaml", "../base/b.yaml"], "optim": {"lr": 0.5}}
    )
    cfg = load_config(exp, ["trainer.max_steps=7"])
    assert cfg.seed == 2  # later base wins
    assert cfg.optim.lr == 0.5 and cfg.optim.warmup_steps == 5  # the file wins over its bases, merged deeply
    assert cfg.trainer.max_steps == 7  # command line wins over everything
    assert cfg.data.batch_size == 16  # embedded default
    assert cfg.name == "e-trainer.max_steps=7"


def test_one_line_component_swap(tiny_experiment):
    cfg = load_config(tiny_experiment, ["model.connector.name=linear", "model.pooler.name=pool1d"])
    assert dict(cfg.model.connector) == {"name": "linear"}  # mlp's depth is gone with the mlp
    assert cfg.model.pooler.name == "pool1d" and "stride" not in cfg.model.pooler


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lrr=1", r"command line: optim.lrr: unknown key \(did you mean 'lr'\?\)"),
        (
            "model.pooler.strid=2",
            r"command line: model.pooler.strid: unknown argument for pooler 'pool2d' \(did you mean 'stride'\?\)",
        ),
        (
            "model.encoder.name=timm_vt",
            r"command line: model.encoder.name: unknown encoder 'timm_vt' \(did you mean 'timm_vit'\?\)",
        ),
        (
            "trainer.max_step=3",
            r"command line: trainer.max_step: not an argument of lightning.Trainer \(did you mean 'max_steps'\?\)",
        ),
        (
            "model.decoder.pattern=m-q-",
            r"model.decoder.pattern: .*'q' at position 2 is not a layer letter; allowed: '\*' attention",
        ),
        (
            "model.decoder.mixers.mamba.d_stat=3",
            r"model.decoder.mixers.mamba.d_stat: unknown argument for mixer 'mamba'",
        ),
        ("model.connector.in_dim=3", r"model.connector.in_dim: is derived"),
        ("optim.lr", r"not of the form key=value"),
    ],
)
def test_errors_name_the_source_and_key(tiny_experiment, override, pattern):
    with pytest.raises(ChimeraError, match=pattern):
        load_config(tiny_experiment, [override])


def test_error_names_the_file_that_set_the_key(tmp_path):
    write(tmp_path / "base.yaml", {"model": {**TINY_MODEL, "pooler": {"name": "pool2d", "strde": 2}}})
    exp = write(tmp_path / "exp.yaml", {"base": ["base.yaml"], "seed": 3})
    with pytest.raises(ChimeraError) as info:
        load_config(exp)
    assert str(info.value).startswith(f"{(tmp_path / 'base.yaml').resolve()}: model.pooler.strde")


def test_yaml_syntax_and_missing_files(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model: [unclosed\n")
    with pytest.raises(ChimeraError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ChimeraError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    exp = write(tmp_path / "e.yaml", {"base": ["missing.yaml"]})
    with pytest.raises(ChimeraError, match="e.yaml: base: file 'missing.yaml' not found"):
        load_config(exp)


def test_cli_user_error_exits_2_with_one_line(tiny_experiment):
    out = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "describe", str(tiny_experiment), "model.pooler.strid=2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.pooler.strid" in lines[0] and "Traceback" not in out.stderr


def test_base_on_the_command_line_merges_that_file_over_the_experiment(tmp_path, monkeypatch):
    """`chimera train A.yaml base=B.yaml` = a file with `base: [A.yaml, B.yaml]` (B's keys win, the
    other overrides win over both); a missing file is an error naming it, not a silently ignored key."""
    write(tmp_path / "a.yaml", {"model": TINY_MODEL, "optim": {"lr": 0.1, "weight_decay": 0.5}, "seed": 3})
    (tmp_path / "b.yaml").write_text("optim: {lr: 0.2}\n")
    (tmp_path / "both.yaml").write_text("base: [a.yaml, b.yaml]\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "a.yaml", ["base=b.yaml", "seed=4"])
    both = load_config(tmp_path / "both.yaml", ["seed=4"])
    assert cfg.optim.lr == both.optim.lr == 0.2 and cfg.optim.weight_decay == 0.5 and cfg.seed == 4
    with pytest.raises(ChimeraError, match=r"base=missing.yaml: not an experiment file"):
        load_config(tmp_path / "a.yaml", ["base=missing.yaml"])
