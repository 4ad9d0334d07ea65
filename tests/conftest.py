"""Shared fixtures: offline mode, tiny configs, a scratch output dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist): one thread each, and the training processes
    # the tests start inherit one too (two workers of 2 OpenMP threads on 2 cores spin-wait: 10-50x slower)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def _tracking_env():
    """``mlflow.set_tracking_uri`` (MLflow 3) sets $MLFLOW_TRACKING_URI, which Chimera honours: a test that calls
    it would send every later test's runs to its store. Each test starts and ends with the variable as it was."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


TINY_MODEL = {
    "encoder": {
        "name": "timm_vit",
        "model_name": "vit_base_patch16_clip_224.openai",
        "img_size": 16,
        "select_layer": -1,
        "freeze": False,
        "model_args": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
    },
    "pooler": {"name": "pool2d", "stride": 2},
    "connector": {"name": "mlp", "depth": 2},
    "decoder": {
        "name": "hybrid",
        "d_model": 32,
        "n_layers": 2,
        "pattern": "hybrid_1_1",
        "mixers": {"attention": {"n_heads": 2}, "mamba": {"d_state": 4}},
        "ffns": {"mlp": {"d_ff": 64}},
    },
}


@pytest.fixture
def tiny_experiment(tmp_path: Path) -> Path:
    """A complete experiment YAML that trains in seconds, writing under tmp_path."""
    import yaml

    cfg = {
        "model": TINY_MODEL,
        "data": {
            "train": {"name": "synthetic_shapes", "size": 64, "tasks": ["color"]},
            "val": {"name": "synthetic_shapes", "size": 16, "split": "val", "tasks": ["color"]},
            "batch_size": 8,
            "max_length": 48,
        },
        "trainer": {
            "max_steps": 4,
            "val_check_interval": 4,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "accelerator": "cpu",
        },
        "checkpoint": {"every_n_steps": 2},
        "output_dir": str(tmp_path / "runs"),
        "tracking": {"experiment": "tests"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
