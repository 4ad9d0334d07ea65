"""The memory policy end to end: FSDP2 on 2 CPU processes with a meta-device build, through ``train``.

One subprocess (``memory_policy_script.py`` under torchrun) trains the tiny hybrid with ``strategy.init=meta``,
the encoder frozen in bf16 and whole on every rank, activation checkpointing by layer kind and
``reshard_after_forward=auto``, 3 steps then ``resume`` to 6; then a two-stage recipe built on meta, whose
second stage loads the first one's weights straight into its shards (``toolkit.init.load_sharded``).

What is compared: the exported encoder is exactly the eager build's (it is built for real, first, from the same
seed, and stays frozen) rounded to bf16; the resumed run is one MLflow run over 6 steps whose loss falls; the
second stage, which trains only the connector, exports stage 1's encoder and decoder bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 6


def _config(tmp_path: Path) -> tuple[Path, Path]:
    cfg = {
        "model": TINY_MODEL,
        "data": {
            "train": {"name": "synthetic_shapes", "size": 64, "tasks": ["color", "caption"]},
            "val": None,
            "batch_size": 8,
            "max_length": 48,
        },
        "optim": {"lr": 3e-3, "min_lr_ratio": 1.0},
        "trainer": {
            "max_steps": STEPS,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
            "gradient_clip_val": 1.0,
        },
        "checkpoint": {"every_n_steps": 3},
        "output_dir": str(tmp_path / "runs"),
        "tracking": {"experiment": "memory_policy"},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    staged = dict(cfg)
    staged["stages"] = [
        {"name": "all", "trainer": {"max_steps": 2}},
        {"name": "connector", "trainable": ["connector.*"], "trainer": {"max_steps": 1}},
    ]
    staged_path = tmp_path / "staged.yaml"
    staged_path.write_text(yaml.safe_dump(staged, sort_keys=False))
    return path, staged_path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory_policy")
    config, staged = _config(tmp)
    out = tmp / "runs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(Path(__file__).with_name("memory_policy_script.py")),
        str(config),
        str(staged),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    result["config"] = str(config)
    result["uri"] = f"sqlite:///{tmp / 'runs' / 'mlflow.db'}"
    return result


def _losses(uri: str, run_id: str) -> dict[int, float]:
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")}


def test_meta_build_with_a_frozen_bf16_encoder_trains_checkpoints_and_resumes(runs):
    first, resumed = runs["fsdp_meta_first"], runs["fsdp_meta"]
    assert first["stages"][0]["step"] == 3 and resumed["stages"][0]["step"] == STEPS
    assert first["run_id"] == resumed["run_id"]  # one MLflow run across the restart
    ckpt = Path(resumed["run_dir"]) / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and {".metadata", "meta.pt"} <= {p.name for p in ckpt.iterdir()}
    losses = _losses(runs["uri"], resumed["run_id"])
    assert sorted(losses) == list(range(STEPS))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS - 1] < losses[0]


def test_the_frozen_encoder_is_the_eager_build_s_kept_in_bf16(runs):
    from toolkit.assemble import build_model
    from toolkit.checkpointing import read_state_dict
    from toolkit.plan import load_plan

    exported = read_state_dict(runs["fsdp_meta"]["stages"][0]["weights"])
    plan = load_plan(runs["config"], ["model.encoder.freeze=true"])
    torch.manual_seed(int(plan.cfg.seed))  # as the stage does before building
    eager = build_model(plan.cfg, plan.tokenizer).state_dict()
    assert set(exported) == set(eager)
    for name, value in exported.items():
        if name.startswith("encoder."):
            assert value.dtype == torch.bfloat16, name
            assert torch.equal(value, eager[name].to(torch.bfloat16)), name  # built for real, never trained
        else:
            assert value.dtype == torch.float32, name


def test_a_stage_built_on_meta_starts_from_the_previous_stage_s_weights(runs):
    from toolkit.checkpointing import read_state_dict

    stages = {s["name"]: s for s in runs["staged_meta"]["stages"]}
    assert stages["all"]["step"] == 2 and stages["connector"]["step"] == 1
    before = read_state_dict(stages["all"]["weights"])
    after = read_state_dict(stages["connector"]["weights"])
    assert set(before) == set(after)
    for name, value in before.items():
        if name.startswith("connector."):
            continue
        assert torch.equal(after[name], value), name  # loaded into the shards, then frozen
    assert any(not torch.equal(after[n], before[n]) for n in before if n.startswith("connector."))
