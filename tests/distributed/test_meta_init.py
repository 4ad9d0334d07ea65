"""Meta-device build + FSDP2 + materialisation on 2 CPU processes (gloo), without Lightning.

``init_script.py``: a small multimodal model with every layer kind, built eagerly (the reference) and on meta,
sharded and materialised shard by shard. Every tensor is initialised (``materialize`` would raise otherwise);
deterministic initialisations (norm weights, zero biases, Mamba's A_log and D) are the eager build's exactly;
random ones follow its distributions, and the two ranks' halves never repeat each other (each rank draws from
its own stream on CPU). The eager weights, exported as a stage hand-off is, load straight into the shards
(each rank reading its rows of a safetensors file, or rank 0 broadcasting a .ckpt) and give the eager logits.
``part_precision`` and ``reshard_after_forward: auto`` give each FSDP unit its policy.

``memory_script.py``: a 1.33 GB (fp32) decoder built on meta, sharded, materialised and run forward once (bf16)
grows each process's peak resident memory by less than 0.7x its full size; the eager build grows it by 1x.
Measured here (2 ranks, 2 cores): 0.50x after materialising, 0.64x after the forward; eager 1.00x.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

HERE = Path(__file__).parent


def _torchrun(script: str, *args: str, env: dict[str, str] | None = None, timeout: int = 400) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(HERE / script),
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def init_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("meta_init")
    _torchrun("init_script.py", str(out))
    return json.loads((out / "result.json").read_text())


def test_every_tensor_is_initialised_and_deterministic_ones_equal_the_eager_build(init_result):
    tensors = init_result["init"]
    assert init_result["init_logits_finite"]
    assert all(t["finite"] for t in tensors.values())
    deterministic = [n for n, t in tensors.items() if t["deterministic"]]
    assert any(".A_log" in n for n in deterministic) and any("norm" in n for n in deterministic)
    for name in deterministic:
        assert tensors[name]["equal"], name


def test_random_tensors_follow_the_eager_distributions_without_repeating_across_ranks(init_result):
    checked = 0
    for name, t in init_result["init"].items():
        if t["deterministic"]:
            continue
        assert t["halves_equal"] is not True, name  # rank 1's rows are not rank 0's
        n = t["numel"]
        if n < 256:  # too few numbers for statistics (Mamba-2's per-head dt_bias, A_log...)
            continue
        checked += 1
        spread = max(t["ref_std"], 1e-12)
        assert abs(t["mean"] - t["ref_mean"]) < 6 * spread / math.sqrt(n) + 1e-3 * abs(t["ref_mean"]), name
        assert abs(t["std"] / spread - 1) < 6 / math.sqrt(2 * n) + 0.02, name
    assert checked > 40


@pytest.mark.parametrize("source", ["load_safetensors", "load_ckpt"])
def test_weights_load_straight_into_the_shards(init_result, source):
    loaded = init_result[source]
    assert loaded["keys_match"] and loaded["unequal"] == []
    assert loaded["logits_max_diff"] < 1e-5


def test_meta_build_of_a_1gb_decoder_stays_under_0_7x_per_process(tmp_path):
    # glibc's dynamic mmap threshold would keep freed gathered layers in its heap (resident, counted twice);
    # a fixed threshold returns them to the system at once, for the eager build alike
    _torchrun("memory_script.py", str(tmp_path), env={"MALLOC_MMAP_THRESHOLD_": "131072"}, timeout=300)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        full = r["full_bytes"]
        assert full >= 2**30 and r["eager_full_bytes"] == full
        assert r["local_bytes"] == full // 2  # every parameter sharded over the 2 ranks
        assert r["finite"]
        assert r["meta_growth"] < 0.7 * full, (rank, r["meta_growth"] / full)
        assert r["eager_growth"] >= full, (rank, r["eager_growth"] / full)


def test_part_precision_and_reshard_auto_set_each_unit_s_policy(init_result):
    units = {u["name"]: u for u in init_result["policy"]["units"]}
    decoder = sorted(n for n in units if n.startswith("decoder.layers."))
    encoder = [n for n in units if n.startswith("encoder.")]
    assert len(decoder) == 4 and len(encoder) == 2
    for name in decoder:  # bf16 gathers and compute, fp32 handed back to the rest of the model
        assert (
            units[name]["param_dtype"] == "torch.bfloat16" and units[name]["output_dtype"] == "torch.float32"
        )
    for name in encoder:  # trainer.precision (32-true): no cast
        assert units[name]["param_dtype"] == "None"
    assert [units[n]["reshard"] for n in decoder] == [True, True, True, False]  # the last one run stays
    assert all(units[n]["reshard"] for n in encoder)
    assert init_result["policy"]["logits_dtype"] == "torch.float32" and init_result["policy"]["logits_finite"]
