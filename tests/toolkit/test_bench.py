"""``chimera bench mixers --json``: stable keys with raw seconds beside every ratio (quick sizes)."""

from __future__ import annotations

import json

import pytest

from toolkit.cli import main


@pytest.mark.slow
def test_bench_mixers_json_keys(capsys):
    assert main(["bench", "mixers", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    m1, m2 = result["mamba1"], result["mamba2"]
    # both sides of every comparison were measured, in the same run
    assert m1["runs"]["ours"] >= 1 and m1["runs"]["transformers"] >= 1
    assert m2["runs"]["chunked"] >= 1 and m2["runs"]["sequential"] >= 1
    for value in (m1["ours_s"], m1["transformers_s"], m2["chunked_s"], m2["sequential_s"], m2["mixer_s"]):
        assert 0 < value < 600
    assert {"speedup_vs_transformers", "target_speedup"} <= set(m1) and "speedup_vs_sequential" in m2
    assert set(result["prefill"]) == {"256", "512", "1024"}
    for row in result["prefill"].values():
        assert (
            0 < row["hybrid_s"] < 600 and 0 < row["transformer_s"] < 600 and "hybrid_over_transformer" in row
        )
    assert result["command"].startswith("chimera bench mixers") and result["quick"] is True
