"""``chimera bench vision``: stable keys, both sides of each comparison measured, summaries from raw times."""

from __future__ import annotations

import json

from toolkit import bench_vision as bv
from toolkit.cli import main


def _check(result: dict) -> None:
    e, d = result["encode"], result["decoder_step"]
    # encode: both sides measured, in the same run, on the same images and weights
    assert len(e["batched_s_all"]) == e["repeats"] == len(e["one_by_one_s_all"]) >= 1
    assert 0 < e["batched_s"] == min(e["batched_s_all"])
    assert 0 < e["one_by_one_s"] == min(e["one_by_one_s_all"])
    assert e["batched_speedup"] == e["one_by_one_s"] / e["batched_s"]
    assert e["batched_images_per_s"] == e["images"] / e["batched_s"]
    assert e["outputs_match"] is True  # batching changes the speed, not the features
    # decoder step: 576 vs 144 tokens per image, both measured
    assert d["tokens_per_image"] == [576, 144]
    assert len(d["step_576_s_all"]) == d["repeats"] == len(d["step_144_s_all"]) >= 1
    assert 0 < d["step_576_s"] == min(d["step_576_s_all"])
    assert 0 < d["step_144_s"] == min(d["step_144_s_all"])
    assert d["ratio_576_over_144"] == d["step_576_s"] / d["step_144_s"]
    n, text = d["images_per_sample"], d["text_tokens"]
    assert d["seq_len_576"] == n * 576 + text and d["seq_len_144"] == n * 144 + text
    assert d["token_ratio"] == d["seq_len_576"] / d["seq_len_144"]
    json.dumps(result, allow_nan=False)  # what --json prints: strict JSON


def test_quick_bench_reports_the_issue_keys():
    result = bv.bench_vision(quick=True)
    _check(result)
    assert result["quick"] is True and result["encode"]["images"] == bv.QUICK["n_images"]
    text = bv.format_vision(result)
    assert "batched_speedup" in text and "ratio_576_over_144" in text and "images/s" in text


def test_the_full_bench_sizes_match_the_issue():
    """The full run (not executed here): 64 images to encode, 8 images x 576 = 4,608 image tokens a sample."""
    import inspect

    assert inspect.signature(bv.bench_encode).parameters["n_images"].default == 64
    step = inspect.signature(bv.bench_decoder_step).parameters
    assert step["images_per_sample"].default == 8 and step["tokens"].default == (576, 144)
    assert 8 * 576 == 4608


def test_cli_prints_json_with_the_command(capsys, monkeypatch):
    # not started as `chimera bench ...`: the command is rebuilt from the flags
    monkeypatch.setattr("sys.argv", ["pytest"])
    assert main(["bench", "vision", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    _check(result)
    assert result["command"] == "chimera bench vision --quick --json"
