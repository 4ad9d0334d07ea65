"""``chimera table`` / ``chimera plot`` over an MLflow store written here: every number of the table equals
what ``mlflow.search_runs`` (last values) and the metric history (best values) say for the same runs; mean
and sample std over seeds, deltas to the baseline, duplicates and unfinished runs, staged runs, the md / csv /
latex text, the PNG, and both stored on the ablation's summary run."""

from __future__ import annotations

import csv
import io
import statistics

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from toolkit.errors import ChimeraError
from toolkit.report import compute_table, format_csv, format_latex, format_md, parse_metric, plot, table

T0 = 1_700_000_000_000  # ms

# variant -> seed -> val/acc history (step, value): best != final on purpose
ACC = {
    "base": {0: [(9, 0.30), (19, 0.50), (29, 0.45)], 1: [(9, 0.20), (19, 0.40), (29, 0.42)]},
    "wide": {0: [(9, 0.40), (19, 0.70), (29, 0.60)], 1: [(9, 0.50), (19, 0.55), (29, 0.65)]},
}
WALL = {"base": (120.0, 130.0), "wide": (200.0, 260.0)}


def _run(c, exp, variant, seed, *, acc, start, wall, status="FINISHED", params=None, extra_tags=None):
    tags = {
        "chimera.ablation": "abl",
        "chimera.variant": variant,
        "chimera.seed": str(seed),
        **(extra_tags or {}),
    }
    run = c.create_run(exp, start_time=start, tags=tags, run_name=f"abl-{variant}-s{seed}")
    rid = run.info.run_id
    metrics = []
    for i, (step, value) in enumerate(acc):
        at = start + 1000 * (i + 1)
        metrics += [
            Metric("val/acc", value, at, step),
            Metric("val/loss", 2.0 - value, at, step),
            Metric("perf/tokens_per_s", 1000.0 + 10 * i + seed, at, step),
        ]
    params = [Param(k, v) for k, v in (params or {}).items()]
    c.log_batch(rid, metrics=metrics, params=params)  # one commit per run: the fixture stays quick
    if status != "RUNNING":
        c.set_terminated(rid, status, end_time=start + int(wall * 1000))
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Store ``ROOT/runs/mlflow.db`` (one per module; tests only read it, or add the summary run): ablation ``abl`` with variants base and wide x seeds 0, 1; a staged
    variant ``staged`` (one seed); plus an older duplicate, a killed run and another ablation's run."""
    from toolkit import tracking

    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    (root / "runs").mkdir()
    tracking.ensure_store(uri)
    c = MlflowClient(uri)
    exp = c.create_experiment("ablations", artifact_location=tracking.artifact_location(uri))
    ids = {}
    for variant, seeds in ACC.items():
        params = {
            "total_params": "1205504" if variant == "base" else "2411008",
            "trainable_params": "1000000",
        }
        params["image_tokens"] = "16" if variant == "base" else "64"
        for seed, acc in seeds.items():
            start = T0 + 10_000_000 * (seed + 1)
            ids[variant, seed] = _run(
                c, exp, variant, seed, acc=acc, start=start, wall=WALL[variant][seed], params=params
            )
    # an older finished run of base/seed 0 (a rerun replaced it) and a killed one of wide/seed 2: both ignored
    _run(c, exp, "base", 0, acc=[(29, 0.99)], start=T0, wall=5.0, params={"total_params": "1"})
    _run(c, exp, "wide", 2, acc=[(9, 0.99)], start=T0 + 90_000_000, wall=5.0, status="KILLED")
    # a staged recipe: the parent carries the tags, its stage runs the metrics (the last stage's count)
    parent = c.create_run(
        exp, start_time=T0, tags={"chimera.ablation": "abl", "chimera.variant": "staged", "chimera.seed": "0"}
    ).info.run_id
    for index, acc in ((1, [(9, 0.10), (19, 0.20)]), (2, [(9, 0.35), (19, 0.33)])):
        _run(
            c, exp, "staged", 0, acc=acc, start=T0 + index, wall=1.0,
            params={"trainer.max_steps": "20", "total_params": "1205504", "image_tokens": "16", "trainable_params": str(index)},
            extra_tags={"mlflow.parentRunId": parent, "chimera.stage_index": str(index)},
        )  # fmt: skip
    c.set_terminated(parent, "FINISHED", end_time=T0 + 300_000)
    ids["staged", 0] = parent
    other = c.create_run(
        exp, tags={"chimera.ablation": "other", "chimera.variant": "base", "chimera.seed": "0"}
    )
    c.set_terminated(other.info.run_id, "FINISHED")
    return uri, ids, root


def _search(uri: str, variant: str):
    """What MLflow itself says: the FINISHED top-level runs of a variant, newest per seed."""
    mlflow.set_tracking_uri(uri)
    try:
        df = mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"tags.`chimera.ablation` = 'abl' and tags.`chimera.variant` = '{variant}' "
            "and attributes.status = 'FINISHED'",
        )
    finally:
        mlflow.set_tracking_uri(None)
    df = df[df["tags.mlflow.parentRunId"].isna()] if "tags.mlflow.parentRunId" in df else df
    return df.sort_values("start_time").groupby("tags.chimera.seed").tail(1)


def test_metric_specs():
    assert parse_metric("val/acc") == parse_metric("val/acc:final")
    assert parse_metric("val/acc:best").mode == "max" and parse_metric("val/loss:best").mode == "min"
    assert parse_metric("train/error:best").mode == "min" and parse_metric("val/loss:max").mode == "max"
    assert parse_metric("val/acc:best").label == "val/acc (best, max)"
    with pytest.raises(ChimeraError, match="expected KEY"):
        parse_metric("val/acc:median")


def test_table_values_equal_search_runs_and_metric_history(store):
    uri, ids, _ = store
    client = MlflowClient(uri)
    result = compute_table(
        uri, "abl", ["val/acc:final", "val/acc:best", "val/loss:best"], order=["base", "wide"]
    )
    rows = {r.variant: r for r in result.rows}
    assert [r.variant for r in result.rows] == ["base", "wide", "staged"]  # file order, then the rest
    assert result.baseline == "base"
    assert result.unfinished == ["wide seed 2 (killed)"]
    expected = {}
    for variant in ("base", "wide"):
        df = _search(uri, variant)
        assert sorted(df["tags.chimera.seed"]) == ["0", "1"]
        final = list(df["metrics.val/acc"])
        best = [max(m.value for m in client.get_metric_history(r, "val/acc")) for r in df["run_id"]]
        best_loss = [min(m.value for m in client.get_metric_history(r, "val/loss")) for r in df["run_id"]]
        row = rows[variant]
        assert row.seeds == ["0", "1"]
        for spec, values in zip(result.specs, (final, best, best_loss)):
            cell = row.cells[spec]
            assert sorted(cell.values) == sorted(values)
            assert cell.mean == pytest.approx(statistics.fmean(values))
            assert cell.std == pytest.approx(statistics.stdev(values))
            expected[variant, spec.column] = statistics.fmean(values)
        wall = [(e - s).total_seconds() for s, e in zip(df["start_time"], df["end_time"])]
        assert row.wall_s == pytest.approx(statistics.fmean(wall))
        tps = [
            statistics.fmean(m.value for m in client.get_metric_history(r, "perf/tokens_per_s"))
            for r in df["run_id"]
        ]
        assert row.tokens_per_s == pytest.approx(statistics.fmean(tps))
        assert row.total_params == int(df["params.total_params"].iloc[0])
        assert row.image_tokens == int(df["params.image_tokens"].iloc[0])
    # the numbers themselves (the fixture's histories): final != best
    assert expected["base", "val/acc:final"] == pytest.approx((0.45 + 0.42) / 2)
    assert expected["base", "val/acc:max"] == pytest.approx((0.50 + 0.42) / 2)
    assert expected["wide", "val/acc:max"] == pytest.approx((0.70 + 0.65) / 2)
    for spec in result.specs:
        assert rows["base"].cells[spec].delta is None  # the baseline
        assert rows["wide"].cells[spec].delta == pytest.approx(
            expected["wide", spec.column] - expected["base", spec.column]
        )
    assert rows["wide"].wall_s == pytest.approx(230.0) and rows["base"].wall_s == pytest.approx(125.0)
    # the staged variant: its last stage's metrics, its parent's wall time
    staged = rows["staged"]
    spec_final, spec_best = result.specs[0], result.specs[1]
    assert staged.cells[spec_final].values == [0.33] and staged.cells[spec_best].values == [0.35]
    assert staged.cells[spec_final].std is None  # one seed
    assert staged.trainable_params == 2 and staged.wall_s == pytest.approx(300.0)


def test_baseline_can_be_any_variant(store):
    uri, _, root = store
    result = compute_table(uri, "abl", ["val/acc:final"], order=["base", "wide"], baseline="wide")
    rows = {r.variant: r for r in result.rows}
    assert rows["base"].cells[result.specs[0]].delta == pytest.approx((0.45 + 0.42) / 2 - (0.60 + 0.65) / 2)
    assert rows["wide"].cells[result.specs[0]].delta is None


def test_formats(store):
    uri, _, root = store
    result = compute_table(uri, "abl", ["val/acc:final", "val/acc:best"], order=["base", "wide"])
    md = format_md(result)
    lines = md.splitlines()
    assert lines[0].startswith("Ablation abl: mean ± sample std over seeds [0, 1]")
    assert "(final) = the last logged value" in lines[0] and "(best, max|min)" in lines[0]
    assert "Not finished (left out): wide seed 2 (killed)" in lines[0]
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:6] == ["variant", "seeds", "val/acc (final)", "Δ", "val/acc (best, max)", "Δ"]
    assert header[6:] == ["params", "trainable", "image tokens", "tokens/s", "wall"]
    cells = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[4:]
    }
    assert cells["base"][1:6] == ["2", "0.435 ± 0.021", "baseline", "0.460 ± 0.057", "baseline"]
    assert cells["wide"][2:6] == ["0.625 ± 0.035", "+0.190", "0.675 ± 0.035", "+0.215"]
    assert cells["wide"][6:] == ["2.41M", "1.00M", "64", "1,010", "3m50s"]
    assert cells["staged"][1:4] == ["1", "0.330", "-0.105"]

    parsed = list(csv.DictReader(io.StringIO(format_csv(result))))
    assert [r["variant"] for r in parsed] == ["base", "wide", "staged"]
    wide = parsed[1]
    assert float(wide["val/acc:final_mean"]) == pytest.approx(0.625)
    assert float(wide["val/acc:max_delta"]) == pytest.approx(0.215)
    assert float(wide["val/acc:final_std"]) == pytest.approx(statistics.stdev([0.60, 0.65]))
    assert parsed[0]["val/acc:final_delta"] == "" and parsed[2]["val/acc:final_std"] == ""
    assert wide["n_seeds"] == "2" and wide["seeds"] == "0 1" and wide["total_params"] == "2411008"
    assert float(wide["wall_s"]) == pytest.approx(230.0) and wide["image_tokens"] == "64"

    tex = format_latex(result)
    assert tex.splitlines()[0].startswith("% Ablation abl")
    assert r"\begin{tabular}{l" + "r" * 10 + "}" in tex and tex.rstrip().endswith(r"\end{tabular}")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"wide & 2 & 0.625 $\pm$ 0.035 & +0.190 & 0.675 $\pm$ 0.035 & +0.215 & 2.41M" in tex
    assert r"val/acc (final) & $\Delta$" in tex


def test_table_and_plot_are_stored_on_the_summary_run(store, tmp_path):
    uri, _, root = store
    text = table("abl", fmt="csv", metrics=["val/acc:best"], tracking_uri=uri)
    assert text.splitlines()[0].startswith("variant,val/acc:max_mean")
    png = plot("abl", out=tmp_path / "out" / "curves.png", tracking_uri=uri)
    assert png == tmp_path / "out" / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    summaries = client.search_runs(
        experiments, "tags.`chimera.ablation` = 'abl' and tags.`chimera.summary` = 'true'"
    )
    assert len(summaries) == 1
    summary = summaries[0].info.run_id
    assert sorted(a.path for a in client.list_artifacts(summary)) == ["curves.png", "table.csv"]
    table("abl", fmt="latex", tracking_uri=uri)  # a second command reuses the summary run
    table("abl", fmt="md", tracking_uri=uri, store=False)
    assert len(client.search_runs(experiments, "tags.`chimera.summary` = 'true'")) == 1
    assert sorted(a.path for a in client.list_artifacts(summary)) == ["curves.png", "table.csv", "table.tex"]
    # the default place of the plot: next to the store
    assert plot("abl", tracking_uri=uri, store=False) == root / "runs" / "ablations" / "abl" / "curves.png"


def test_table_from_the_ablation_file(store, tmp_path, tiny_experiment):
    """A file gives the store (its base's output_dir), the variant order, the baseline and the metrics."""
    _, _, root = store
    cfg = yaml.safe_load(tiny_experiment.read_text())
    tiny_experiment.write_text(yaml.safe_dump({**cfg, "output_dir": str(root / "runs")}, sort_keys=False))
    path = tmp_path / "abl.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": "tiny.yaml",
                "baseline": "wide",
                "metrics": ["val/acc:best"],
                "variants": {"wide": {"optim.lr": 0.01}, "base": {}, "missing": {}},
            },
            sort_keys=False,
        )
    )
    text = table(path, store=False)
    lines = text.splitlines()
    assert "baseline wide" in lines[0] and "val/acc (best, max)" in lines[2] and "val/acc (final)" not in text
    assert [line.split("|")[1].strip() for line in lines[4:]] == ["wide", "base", "missing", "staged"]
    assert lines[6].split("|")[2].strip() == "0"  # a variant without runs: its row says so


def test_unknown_ablation_and_missing_file(store, tmp_path):
    uri, _, root = store
    with pytest.raises(ChimeraError, match="no runs of ablation 'nope'"):
        table("nope", tracking_uri=uri)
    with pytest.raises(ChimeraError, match="ablation file not found"):
        table(str(tmp_path / "missing.yaml"), tracking_uri=uri)
    with pytest.raises(ChimeraError, match="--format"):
        table("abl", fmt="html", tracking_uri=uri)
    empty = f"sqlite:///{tmp_path / 'nothing' / 'mlflow.db'}"
    with pytest.raises(ChimeraError, match="no runs of ablation 'abl'"):
        table("abl", tracking_uri=empty)
    assert not (tmp_path / "nothing" / "mlflow.db").exists()  # a read never creates a store
