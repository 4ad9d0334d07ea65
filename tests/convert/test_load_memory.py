"""Loading at size: a decoder built on the meta device takes the checkpoint's tensors as its parameters, so
the resident memory grows by about one copy of the weights (a random init followed by a copy would be two)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = r"""
import json, sys, torch

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)

from toolkit.convert import decoder_from_hf
from toolkit.registry import build
build("decoder", {"name": "hybrid", "d_model": 8, "n_layers": 1, "vocab_size": 8,
                  "mixers": {"attention": {"n_heads": 2}}})  # every lazy import done before measuring
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark (VmHWM) to the current RSS
    reset = True
except OSError:
    reset = False
before = status("VmRSS")
decoder = decoder_from_hf(sys.argv[1])
peak = status("VmHWM")
n_bytes = sum(p.numel() * p.element_size() for p in decoder.parameters())
print(json.dumps({"before": before, "peak": peak, "bytes": n_bytes, "reset": reset}))
"""


def test_rss_growth_is_about_one_copy_of_the_weights(tmp_path):
    from toolkit.convert import export_hf
    from toolkit.registry import build

    node = {
        "name": "hybrid",
        "d_model": 512,
        "n_layers": 4,
        "vocab_size": 32000,
        "mixers": {"attention": {"n_heads": 8}},
        "ffns": {"mlp": {"d_ff": 1408}},
    }
    decoder = build("decoder", node)
    size = sum(p.numel() * p.element_size() for p in decoder.parameters())
    assert 180e6 < size < 260e6  # about 200 MB of fp32 weights
    export_hf(decoder, None, str(tmp_path / "hf"), family="llama")
    del decoder
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["reset"]:
        pytest.skip("cannot reset the RSS high-water mark (/proc/self/clear_refs) here")
    assert result["bytes"] == size
    growth = result["peak"] - result["before"]
    assert 0.8 * size < growth < 1.6 * size, (
        f"RSS grew by {growth / size:.2f}x the weights ({growth / 1e6:.0f} MB)"
    )
