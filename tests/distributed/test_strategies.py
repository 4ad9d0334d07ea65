"""DDP and FSDP2 on 2 CPU processes (gloo, 1 thread each) against one process on the same global batch.

One subprocess (``strategies_script.py`` under torchrun, the multi-node launcher, here with one node) trains
the tiny hybrid 6 steps with DDP (also with 2 accumulated micro-batches), with FSDP2 + full checkpoints +
activation checkpointing, with FSDP2 + sharded checkpoints for 3 steps then ``resume`` to 6, and with FSDP2
in bf16-mixed. This process trains the single-device reference.
Two more torchrun processes, started as two nodes of one process each (``--nnodes=2 --node-rank=R`` over
127.0.0.1), train it with DDP through the CLI, as a multi-node job would.

Tolerances: per-step ``train/loss`` within 2e-5 relative of the single process (measured: ~1e-7; fp32
reductions in another order). The data mixes 1-word and 3-word answers, so ranks hold different numbers of
target tokens: a per-rank mean (instead of the global token mean) would miss by far more. FSDP2 resumed from
its sharded checkpoint ends bitwise equal to FSDP2 run through (same reduction order), and its consolidated
export equals the full checkpoint Lightning gathered.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 6


def _config(tmp_path: Path) -> Path:
    cfg = {
        "model": TINY_MODEL,
        "data": {
            "train": {"name": "synthetic_shapes", "size": 64, "tasks": ["color", "caption"]},
            "val": None,
            "batch_size": 8,  # the single process; the script runs 2 ranks x 4
            "max_length": 48,
        },
        "optim": {"lr": 3e-3, "min_lr_ratio": 1.0},  # constant lr: 3 steps + resume to 6 == 6 steps
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
        "tracking": {"experiment": "distributed"},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _losses(uri: str, run_id: str) -> dict[int, float]:
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    config = _config(tmp)
    out = tmp / "runs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(Path(__file__).with_name("strategies_script.py")),
        str(config),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())

    from toolkit.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(config, ["name=single"])
    finally:
        torch.set_num_threads(threads)
    result["single"] = {
        "run_id": single.run_id,
        "weights": single.stages[0].checkpoint,
        "step": single.stages[0].global_step,
    }
    result["uri"] = single.tracking_uri
    result["config"] = str(config)
    return result


def test_ddp_and_fsdp_match_one_process_on_the_same_global_batch(runs):
    reference = _losses(runs["uri"], runs["single"]["run_id"])
    assert len(reference) == STEPS and reference[0] > reference[STEPS - 1]
    for key in ("ddp", "ddp_accumulate", "fsdp_full", "fsdp_sharded"):
        assert runs[key]["step"] == STEPS
        losses = _losses(runs["uri"], runs[key]["run_id"])
        assert sorted(losses) == sorted(reference), key
        for step, value in reference.items():
            assert losses[step] == pytest.approx(value, rel=2e-5), (key, step)


def test_fsdp_bf16_mixed_tracks_the_fp32_run(runs):
    reference = _losses(runs["uri"], runs["single"]["run_id"])
    losses = _losses(runs["uri"], runs["fsdp_bf16"]["run_id"])
    assert sorted(losses) == sorted(reference)
    for step, value in reference.items():  # bf16 has 8 mantissa bits: a few parts in a thousand per step
        assert losses[step] == pytest.approx(value, rel=3e-2), step
    assert losses != reference  # bf16 really was used


def test_fsdp_sharded_checkpoint_resumes_into_the_same_run_and_state(runs):
    first, resumed = runs["fsdp_sharded_first"], runs["fsdp_sharded"]
    assert first["step"] == 3 and resumed["step"] == STEPS
    assert first["run_id"] == resumed["run_id"]  # one MLflow run across the restart
    ckpt = Path(resumed["run_dir"]) / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no partial directory left
    # resumed after 3 steps == run through 6 (the full-format run): same losses, same weights, bit for bit
    assert _losses(runs["uri"], resumed["run_id"]) == _losses(runs["uri"], runs["fsdp_full"]["run_id"])


def test_consolidated_export_loads_in_one_process(runs):
    from toolkit.assemble import build_parts
    from toolkit.checkpointing import load_weights, read_state_dict
    from toolkit.plan import load_plan

    sharded_dir = Path(runs["fsdp_sharded"]["run_dir"]) / "checkpoints" / "last.ckpt"
    exported = read_state_dict(runs["fsdp_sharded"]["weights"])  # final.safetensors, written by rank 0
    from_dcp = read_state_dict(sharded_dir)  # the DCP directory, consolidated here
    gathered = read_state_dict(
        Path(runs["fsdp_full"]["run_dir"]) / "checkpoints" / "last.ckpt"
    )  # Lightning's full file
    assert set(exported) == set(from_dcp) == set(gathered)
    for name, value in gathered.items():
        assert torch.equal(exported[name], value), name
        assert torch.equal(from_dcp[name], value), name
    single = read_state_dict(runs["single"]["weights"])
    assert max((single[n] - gathered[n]).abs().max().item() for n in gathered) < 1e-4
    plan = load_plan(runs["config"])
    model, _ = build_parts(plan.cfg, plan.tokenizer)
    load_weights(model, runs["fsdp_sharded"]["weights"])  # strict: every key of the model
    for name, value in model.state_dict().items():
        if name in gathered:
            assert torch.equal(value, gathered[name]), name


# --------------------------------------------------------------------------------------------- multi-node
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def multinode(runs):
    """Two "nodes" of one process each on this machine: two torchrun launchers with ``--nnodes=2`` and their
    own ``--node-rank``, meeting at 127.0.0.1 (loopback only), each running ``chimera train`` through
    ``-m toolkit.cli`` exactly as on a cluster, with ``trainer.num_nodes=2 trainer.devices=1``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections stay on loopback too
    port = _free_port()
    overrides = [
        "name=multinode",
        "strategy.name=ddp",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "data.batch_size=4",  # per rank: global batch 8 = the single-process run's
    ]

    def launch(node_rank: int) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node_rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "toolkit.cli",
            "train",
            runs["config"],
            *overrides,
        ]
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env
        )

    nodes = [launch(0), launch(1)]
    deadline, outputs = time.monotonic() + 420, []
    try:
        for proc in nodes:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, (proc, out) in enumerate(zip(nodes, outputs)):
        assert proc.returncode == 0, f"node {rank}:\n{out[-6000:]}"
    state = json.loads((Path(runs["config"]).parent / "runs" / "multinode" / "run.json").read_text())
    return {"run_id": state["run_id"], "outputs": outputs}


def test_two_nodes_of_one_process_match_one_process_on_the_same_global_batch(runs, multinode):
    reference = _losses(runs["uri"], runs["single"]["run_id"])
    losses = _losses(runs["uri"], multinode["run_id"])
    assert sorted(losses) == sorted(reference)
    for step, value in reference.items():
        assert losses[step] == pytest.approx(value, rel=2e-5), step
    assert f"MLflow run id {multinode['run_id']}" in multinode["outputs"][0]  # rank 0 (node 0) reports
    assert "MLflow run id" not in multinode["outputs"][1]
