"""``chimera bench gpu`` (toolkit/bench_gpu.py) on a machine without CUDA: the verdict, the JSON, and each part's
plumbing (pytest's report, the training run read back from MLflow, the timing harness) on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from toolkit import bench_gpu


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_without_cuda_it_says_so_writes_the_json_and_fails(no_cuda, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench_gpu.gpu_command(as_json=True, out_json=out) == 1
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # stdout is the JSON alone: `chimera bench gpu --json > gpu.json`
    assert printed["ok"] is False and printed["reason"] == "no CUDA device: nothing to check"
    assert "no CUDA device: nothing to check" in captured.err
    assert json.loads(out.read_text()) == printed
    assert printed["environment"]["torch"] == torch.__version__ and "gpus" not in printed["environment"]
    assert bench_gpu.gpu_command() == 1
    assert capsys.readouterr().out.strip() == "chimera bench gpu: no CUDA device: nothing to check"
    with pytest.raises(ValueError, match="unknown parts"):
        bench_gpu.run_gpu_check(parts=["kernels", "speed"])


def test_parts_are_run_in_order_and_a_failing_or_crashing_part_fails_the_check(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_gpu, "_environment", lambda: {"gpus": [{"name": "fake"}]})
    ran = []

    def part(name, ok=True, crash=False):
        def run(*args, **kwargs):
            ran.append(name)
            if crash:
                raise RuntimeError("boom")
            return {"ok": ok, "reason": "" if ok else f"{name} broke"}

        return run

    monkeypatch.setattr(bench_gpu, "_kernels_part", part("kernels"))
    monkeypatch.setattr(bench_gpu, "run_parity_tests", part("parity", ok=False))
    monkeypatch.setattr(bench_gpu, "run_training_check", part("train", crash=True))
    monkeypatch.setattr(bench_gpu, "bench_kernels", part("mixers"))
    monkeypatch.setattr(bench_gpu, "_prefill_part", part("prefill"))
    out = tmp_path / "gpu.json"
    result = bench_gpu.run_gpu_check(out, workdir=tmp_path / "work")
    assert ran == ["kernels", "parity", "train", "mixers", "prefill"]
    assert result["ok"] is False
    assert result["reason"] == "parity (parity broke); train (RuntimeError: boom)"
    assert json.loads(out.read_text())["reason"] == result["reason"]
    assert result["workdir"] == str(tmp_path / "work")
    only = bench_gpu.run_gpu_check(parts=["kernels", "mixers"], workdir=tmp_path / "work")
    assert only["ok"] is True and "parity" not in only and "fake" in bench_gpu.format_gpu(only)


def test_perf_summary_skips_the_warm_up_window_and_keeps_the_peak_memory():
    history = {
        "perf/step_time_s": [(5, 3.0, 0), (10, 0.5, 0), (15, 0.7, 0), (20, 0.6, 0)],
        "perf/peak_mem_gb": [(5, 9.0, 0), (10, 8.0, 0)],
        "perf/mfu": [(5, 0.1, 0)],
        "perf/tflops": [],
    }
    summary = bench_gpu.perf_summary(history)
    assert summary["steady"] == {"step_time_s": 0.6, "peak_mem_gb": 9.0, "mfu": 0.1}
    assert summary["last"]["step_time_s"] == 0.6 and summary["windows"]["peak_mem_gb"] == [
        [5, 9.0],
        [10, 8.0],
    ]


def test_junit_report_is_read_per_test(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.components.test_mamba" name="test_a[fp32]" time="0.1"/>'
        '<testcase classname="tests.components.test_mamba" name="test_b" time="0.1">'
        '<failure message="AssertionError: out (fp32): max error 1 &gt; 0.1">long text</failure></testcase>'
        '<testcase classname="tests.components.test_mamba2" name="test_c" time="0">'
        '<skipped type="pytest.skip" message="needs CUDA">skip</skipped></testcase>'
        "</testsuite></testsuites>"
    )
    assert bench_gpu._junit_results(xml) == [
        {"test": "tests.components.test_mamba::test_a[fp32]", "outcome": "passed", "message": ""},
        {
            "test": "tests.components.test_mamba::test_b",
            "outcome": "failed",
            "message": "AssertionError: out (fp32): max error 1 > 0.1",
        },
        {"test": "tests.components.test_mamba2::test_c", "outcome": "skipped", "message": "needs CUDA"},
    ]


@pytest.mark.slow
def test_parity_part_runs_the_gpu_tests_and_an_all_skipped_run_is_no_pass(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("with CUDA the GPU tests really run: covered by `chimera bench gpu` itself")
    result = bench_gpu.run_parity_tests(tmp_path, timeout_s=600)
    assert result["returncode"] == 0 and result["passed"] == 0 and result["failed"] == 0
    assert result["skipped"] >= 20 and result["ok"] is False
    assert result["reason"].startswith("no GPU test ran") and "needs CUDA" in result["reason"]
    assert all(t["test"].startswith("tests.components.test_mamba") for t in result["tests"])


TINY = [  # the GPU check's experiment shrunk to seconds on a CPU (same parts: Mamba-2, Mamba-1, attention)
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "data.num_workers=0",
    "model.encoder.img_size=16",
    "model.encoder.model_args.patch_size=8",
    "model.encoder.model_args.embed_dim=32",
    "model.encoder.model_args.depth=1",
    "model.encoder.model_args.num_heads=2",
    "model.decoder.d_model=32",
    "model.decoder.n_layers=4",
    "model.decoder.pattern=M-m-*-M-",
    "model.decoder.mixers.attention.n_heads=2",
    "model.decoder.mixers.mamba2.headdim=16",
    "model.decoder.mixers.mamba2.d_state=16",
    "model.decoder.ffns.mlp.d_ff=64",
    "data.train.size=64",
    "data.train.images_per_sample=2",
    "data.val.images_per_sample=2",
    "data.batch_size=4",
    "data.max_length=64",
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=2",
    "trainer.val_check_interval=4",
]


@pytest.mark.slow
def test_training_part_trains_under_fsdp_and_reads_perf_back_from_mlflow(tmp_path):
    """The real subprocess (`python -m toolkit.cli train experiments/gpu_check.yaml ...`, FSDP2 with a world
    of one, gloo on the CPU) and the MLflow read-back."""
    result = bench_gpu.run_training_check(tmp_path, overrides=TINY, devices=1, timeout_s=600)
    assert result["ok"], result.get("log_tail")
    assert result["returncode"] == 0 and result["run_id"]
    steady, windows = result["perf"]["steady"], result["perf"]["windows"]
    assert [s for s, _ in windows["step_time_s"]] == [1, 3]  # logged at steps 2 and 4 (0-based 1 and 3)
    assert steady["step_time_s"] == windows["step_time_s"][1][1] and steady["tokens_per_s"] > 0
    assert "mfu" not in steady  # no datasheet peak for a CPU
    assert len(result["loss"]) == 2 and (tmp_path / "runs" / "gpu_check" / "final.safetensors").exists()


def test_mixer_timing_harness_runs_the_pytorch_paths_on_cpu():
    result = bench_gpu.bench_kernels(quick=True, device="cpu", repeats=1)
    for name in ("mamba", "mamba2"):
        entry = result[name]
        assert (
            "kernels" not in entry
            and entry["torch"]["train_step_s"] > 0
            and entry["torch"]["decode_step_s"] > 0
        )
