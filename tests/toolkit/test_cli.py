"""The CLI contracts: components, describe (meta device), and a tiny end-to-end train logged to MLflow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from toolkit import registry
from toolkit.cli import main

CLIP_336 = "vit_large_patch14_clip_336.openai"


def test_components_json_lists_every_kind_with_params(capsys):
    assert main(["components", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {(r["kind"], r["name"]): r for r in rows}
    assert {k for k, _ in by} == set(registry.KINDS)
    pool2d = {p["name"]: p for p in by[("pooler", "pool2d")]["params"]}
    assert pool2d["stride"]["default"] == 2 and not pool2d["stride"]["required"]
    assert by[("mixer", "mamba")]["symbol"] == "m" and by[("ffn", "moe")]["symbol"] == "E"
    assert main(["components", "mixer"]) == 0
    text = capsys.readouterr().out
    assert "attention [*]" in text and "d_state" in text


def test_components_unknown_kind_exits_2(capsys):
    assert main(["components", "mixr"]) == 2
    assert "did you mean 'mixer'" in capsys.readouterr().err


def test_describe_reference_on_meta_device():
    """The full 9B LongLLaVA skeleton builds on the meta device: no memory, seconds, 144 tokens per image."""
    code = (
        "import json, resource, sys\n"
        "from toolkit.describe import describe\n"
        "info = describe(sys.argv[1])\n"
        "info['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
        "print(json.dumps(info))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "experiments/longllava/reference.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["image_tokens"] == 144
    assert info["encoder"]["grid"] == [24, 24] and info["encoder"]["width"] == 1024
    parts = info["params"]["by_component"]
    assert set(parts) == {"encoder", "pooler", "connector", "decoder"}
    assert (
        parts["encoder"]["trainable"] == 0 and parts["connector"]["trainable"] == parts["connector"]["total"]
    )
    assert parts["connector"]["total"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu
    assert 9.0e9 < parts["decoder"]["total"] < 9.6e9
    assert info["params"]["total"] == sum(p["total"] for p in parts.values())
    layers = info["layers"]
    assert len(layers) == 32 and [layer["index"] for layer in layers if layer["letters"][0] == "*"] == [
        4,
        12,
        20,
        28,
    ]
    assert info["peak_rss_gb"] < 4  # 9.6B fp32 weights would be ~38 GB: nothing was allocated


def test_describe_text(tiny_experiment, capsys):
    assert main(["describe", str(tiny_experiment)]) == 0
    out = capsys.readouterr().out
    assert "image tokens  4 per image" in out and "pattern       m-*-" in out and "attention + mlp" in out


@pytest.mark.slow
def test_train_end_to_end_logs_to_mlflow(tiny_experiment, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "train", str(tiny_experiment), "optim.lr=3e-3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MLflow run id" in out.stdout
    run_id = out.stdout.split("MLflow run id ")[1].split()[0]
    import mlflow

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tests"])
    row = runs[runs.run_id == run_id].iloc[0]
    assert row["params.model.decoder.pattern"] == "hybrid_1_1"
    assert row["params.optim.lr"] == "0.003"
    assert row["params.model.pooler.name"] == "pool2d"
    for metric in ("metrics.train/loss", "metrics.val/loss", "metrics.val/acc"):
        assert metric in runs.columns and runs.loc[runs.run_id == run_id, metric].notna().all(), metric
    client = mlflow.MlflowClient(uri)
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]
    assert row["tags.chimera.experiment_file"] == str(tiny_experiment)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, part, name",
    [
        (["model.pooler.name=pool1d"], "pooler", "pool1d"),
        (["model.connector.name=linear"], "connector", "linear"),
        # SigLIP architecture: no CLS token, a different timm model
        (["model.encoder.model_name=vit_so400m_patch14_siglip_384"], "encoder", "timm_vit"),
    ],
)
def test_swapped_parts_train_with_no_other_edit(tiny_experiment, override, part, name):
    """One override swaps the part: the trained weights are exactly those of a model with the new part."""
    from toolkit import registry
    from toolkit.assemble import build_model
    from toolkit.checkpointing import load_weights
    from toolkit.plan import load_plan
    from toolkit.train import train

    overrides = [*override, "trainer.max_steps=2", "trainer.val_check_interval=2"]
    plan = load_plan(tiny_experiment, overrides)
    result = train(plan)
    assert result.stages[0].metrics["train/loss"] > 0
    model = build_model(plan.cfg, plan.tokenizer)
    assert type(getattr(model, part)) is registry.get(part, name).target
    load_weights(model, result.stages[0].checkpoint)  # strict: the trained model had this structure
    if part == "encoder":
        assert model.encoder.grid is not None and model.encoder.num_tokens == 16  # no CLS: patches only
        timm_name = model.encoder.model.pretrained_cfg["architecture"]
        assert timm_name.startswith("vit_so400m_patch14_siglip")
