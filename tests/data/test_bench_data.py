"""``chimera bench data``: the loader's rate beside the model's training-step rate, under stable keys."""

from __future__ import annotations

import json
import math


def test_bench_data_reports_both_rates_and_their_ratio(tiny_experiment):
    from toolkit.bench_data import bench_data, format_data

    result = bench_data(str(tiny_experiment), ["data.batch_size=4"], workers=2, batches=3, steps=2)
    json.dumps(result, allow_nan=False)  # what --json prints: strict JSON
    loader, model, fed = result["loader"], result["model"], result["fed"]
    assert result["workers"] == 2 and result["batch"] == {
        "size": 4,
        "seq_len": result["batch"]["seq_len"],
        "images": 4,
    }
    assert loader["batches"] == 3 and loader["samples"] == 12 and loader["images"] == 12
    assert loader["samples_per_s"] > 0 and loader["images_per_s"] == loader["samples_per_s"]  # one image each
    assert model["steps"] == 2 and len(model["step_s_all"]) == 2 and model["samples_per_s"] > 0
    assert math.isclose(result["loader_over_model"], loader["samples_per_s"] / model["samples_per_s"])
    assert fed["steps"] == 2 and fed["samples_per_s"] > 0
    assert result["meets_target"] == (result["loader_over_model"] >= result["target"] == 5.0)
    text = format_data(result)
    assert "loader_over_model" in text and "2 loader workers" in text and "samples/s" in text


def test_bench_data_caps_batches_at_the_epoch(tiny_experiment):
    from toolkit.bench_data import bench_data, format_data

    # 64 samples / 32 = 2 batches: one is the first (start-up) batch, one is timed, none is left to feed
    result = bench_data(str(tiny_experiment), ["data.batch_size=32"], workers=0, batches=10, steps=1)
    assert result["loader"]["batches"] == 1 and result["fed"]["steps"] == 0
    assert result["workers"] == 0 and result["fed"]["samples_per_s"] is None is result["fed_over_model"]
    assert "n/a" in format_data(result)
