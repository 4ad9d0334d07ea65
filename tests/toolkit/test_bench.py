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
    assert m1["speedup_vs_transformers"] == pytest.approx(m1["transformers_s"] / m1["ours_s"])
    assert m2["speedup_vs_sequential"] == pytest.approx(m2["sequential_s"] / m2["chunked_s"])
    assert set(result["prefill"]) == {"256", "512", "1024"}
    for row in result["prefill"].values():
        assert row["hybrid_over_transformer"] == pytest.approx(row["hybrid_s"] / row["transformer_s"])
    assert result["command"].startswith("chimera bench mixers")
