"""``chimera bench generate``: stable keys, exact cache sizes, the tensor-peak counter, a quick run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from toolkit import bench_generate as bg

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_reports_the_issue_keys_with_exact_cache_sizes():
    result = bg.bench_generate(lengths=(48, 96), d_model=64, n_layers=8, new_tokens=3, repeats=1)
    assert result["config"]["patterns"] == {"hybrid": "m-m-m-m-*-m-m-m-", "transformer": "*-" * 8}
    assert set(result["generate"]) == {"48", "96"}
    for L, row in result["generate"].items():
        for key in ("prefill_ratio", "decode_speedup", "memory_ratio", "peak_ratio"):
            assert row[key] > 0, key
        ctx = int(L) + 3  # the cache holds the prompt and the new tokens
        kv = 2 * ctx * 64 * 4  # K and V, fp32, per attention layer (n_heads * head_dim = d_model)
        mamba = (128 * 4 + 128 * 16) * 4  # conv state [d_inner, d_conv] + SSM state [d_inner, d_state]
        assert row["transformer_cache_bytes"] == 8 * kv
        assert row["hybrid_cache_bytes"] == kv + 7 * mamba
        assert row["memory_ratio"] == row["hybrid_cache_bytes"] / row["transformer_cache_bytes"]
        assert row["prefill_ratio"] == row["hybrid_prefill_s"] / row["transformer_prefill_s"]
        # the median of paired step ratios: close to the ratio of median steps on a quiet machine
        assert (
            row["decode_speedup"] > 0
            and row["hybrid_decode_tok_s"] > 0
            and row["transformer_decode_tok_s"] > 0
        )
        assert (
            row["transformer_peak_bytes"] >= row["transformer_cache_bytes"]
        )  # the cache is part of the peak
    text = bg.format_generate(result)
    assert "prefill s" in text and "96" in text
    json.dumps(result)  # --json


def test_tensor_peak_counts_what_is_alive_at_once():
    a = torch.zeros(1000)  # existed before: not counted

    def work():
        x = torch.empty(256)  # 1 KB
        y = x * 2  # 1 KB more: 2 KB alive
        del x
        z = y + 1  # x freed, z allocated: still 2 KB
        z.add_(a[:256])  # in place: nothing allocated
        return a.view(10, 100)  # a view of an older tensor: nothing

    assert bg.peak_bytes(work, torch.device("cpu")) == 2 * 256 * 4


def test_chimera_bench_generate_prints_the_issue_keys_and_its_exact_command():
    """The console command end to end, in a process of its own (small sizes: seconds)."""
    argv = ["bench", "generate", "--json", "--lengths", "32", "64", "--new-tokens", "3", "--d-model", "64"]
    out = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["command"] == "chimera " + " ".join(argv)
    assert result["config"]["d_model"] == 64 and result["config"]["new_tokens"] == 3
    assert set(result["generate"]) == {"32", "64"}
    for row in result["generate"].values():
        for key in ("prefill_ratio", "decode_speedup", "memory_ratio"):
            assert row[key] > 0, key
        assert row["memory_ratio"] == row["hybrid_cache_bytes"] / row["transformer_cache_bytes"]

    bad = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "bench", "generate", "--lengths", "16", "--new-tokens", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert bad.returncode == 2 and "new-tokens" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_table_names_the_command(capsys):
    command = "chimera bench generate --lengths 32 --new-tokens 2 --d-model 64"
    assert bg.generate_bench_command(command=command, lengths=[32], new_tokens=2, d_model=64) == 0
    text = capsys.readouterr().out
    assert "prefill s" in text and "decode tok/s" in text and "cache MB" in text
    assert text.rstrip().endswith(f"(measured by: {command})")
