"""Ablation files and ``chimera ablate``: grid expansion and variant names, the command of each run, the
skip/resume/lock decisions, and a killed sweep that a rerun finishes without training a finished variant
again (subprocesses, as the driver runs them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from toolkit.ablation import (
    FINISHED,
    NEW,
    PARTIAL,
    format_value,
    load_ablation,
    make_jobs,
    run_ablation,
    run_ids,
    run_state,
)
from toolkit.errors import ChimeraError

SHIPPED = sorted((ROOT / "experiments" / "longllava" / "ablations").glob("*.yaml"))


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _ablation(tmp_path: Path, **spec) -> Path:
    return _write(tmp_path / "abl.yaml", {"base": "tiny.yaml", **spec})


# -- the file ------------------------------------------------------------------------------------------


def test_named_variants_keep_their_order_and_overrides(tiny_experiment, tmp_path):
    path = _ablation(
        tmp_path,
        ablation="pools",
        seeds=[3, 5],
        overrides={"data.batch_size": 4, "optim.lr": 1.0e-3},
        variants={
            "none": {"model.pooler.name": "identity"},
            "p1": ["model.pooler.name=pool1d", "model.pooler.stride=4"],
            "same": None,
        },
    )
    ab = load_ablation(path)
    assert ab.name == "pools" and ab.seeds == [3, 5] and ab.baseline == "none"
    assert [v.name for v in ab.variants] == ["none", "p1", "same"]
    assert ab.overrides == ["data.batch_size=4", "optim.lr=0.001"]
    assert ab.variant("none").overrides == ["model.pooler.name=identity"]
    assert ab.variant("p1").overrides == ["model.pooler.name=pool1d", "model.pooler.stride=4"]
    assert ab.variant("same").overrides == []
    assert all(v.base == tiny_experiment.resolve() for v in ab.variants)
    with pytest.raises(ChimeraError, match="no variant 'p11'.*did you mean 'p1'"):
        ab.variant("p11")
    # seed-major order: a sweep that dies early leaves whole seeds behind
    jobs = make_jobs(ab)
    assert [(j.variant.name, j.seed) for j in jobs] == [
        ("none", 3), ("p1", 3), ("same", 3), ("none", 5), ("p1", 5), ("same", 5),
    ]  # fmt: skip
    assert [j.run_name for j in make_jobs(ab, "p1")] == ["pools-p1-s3", "pools-p1-s5"]
    assert [j.seed for j in make_jobs(load_ablation(path, seeds=1))] == [0, 0, 0]


def test_grid_expansion_names_every_point(tiny_experiment, tmp_path):
    path = _ablation(
        tmp_path,
        grid={"model.connector.name": ["linear", "mlp"], "optim.lr": [1.0e-3, 3.0e-3]},
    )
    ab = load_ablation(path)
    assert ab.name == "abl"  # the file's stem
    assert [v.name for v in ab.variants] == [
        "connector=linear,lr=0.001",
        "connector=linear,lr=0.003",
        "connector=mlp,lr=0.001",
        "connector=mlp,lr=0.003",
    ]
    assert ab.variants[1].overrides == ["model.connector.name=linear", "optim.lr=0.003"]
    assert ab.baseline == "connector=linear,lr=0.001"


def test_grid_crossed_with_variants_and_labelled_axes(tiny_experiment, tmp_path):
    other = _write(tmp_path / "other.yaml", {"base": ["tiny.yaml"], "data": {"batch_size": 2}})
    path = _ablation(
        tmp_path,
        variants={"a": {"model.pooler.name": "identity"}, "b": {"base": "other.yaml"}},
        grid={"optim.lr": {"slow": 1.0e-4, "fast": 1.0e-2}},
        baseline="b-fast",
    )
    ab = load_ablation(path)
    assert [v.name for v in ab.variants] == ["a-slow", "a-fast", "b-slow", "b-fast"]
    assert ab.variant("a-fast").overrides == ["model.pooler.name=identity", "optim.lr=0.01"]
    assert ab.variant("b-slow").base == other.resolve() and ab.variant("b-slow").overrides == [
        "optim.lr=0.0001"
    ]
    assert ab.baseline == "b-fast"


def test_same_leaf_on_two_axes_uses_the_full_key(tiny_experiment, tmp_path):
    path = _ablation(tmp_path, grid={"optim.lr": [0.1], "model.decoder.mixers.attention.lr": [0.2]})
    assert load_ablation(path).variants[0].name == "optim.lr=0.1,model.decoder.mixers.attention.lr=0.2"
    path = _ablation(tmp_path, grid={"optim.lr": [0.1], "data.val": [None], "flag": [True], "xs": [[1, 2]]})
    assert load_ablation(path).variants[0].name == "lr=0.1,val=null,flag=true,xs=_1,2_"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"variants": {"a": {}}, "bogus": 1}, "bogus: unknown key"),
        ({}, "no variants"),
        ({"variants": {"a b": {}}}, "safe folder name"),
        ({"variants": {"a": {"name": "x"}}}, "sets name, seed and its tags itself"),
        ({"variants": {"a": ["seed=3"]}}, "sets name, seed and its tags itself"),
        ({"variants": {"a": ["model.pooler.name"]}}, "not of the form key=value"),
        ({"variants": {"a": {}}, "baseline": "b"}, "baseline: no variant 'b'"),
        ({"variants": {"a": {}}, "seeds": 0}, "seeds: expected a count >= 1"),
        ({"variants": {"a": {}}, "seeds": [1, 1]}, "distinct seeds"),
        ({"variants": {"a": {"base": "missing.yaml"}}}, "missing.yaml not found"),
        ({"variants": {"a": {}}, "ablation": "bad name"}, "safe folder name"),
        ({"grid": {"optim.lr": []}}, "non-empty list"),
        ({"grid": {"optim.lr": {"bad label": 1}}}, "safe folder name"),
        ({"variants": {"a": {"optim.lr": 1}}, "grid": {"optim.lr": [1, 2]}}, None),
    ],
)
def test_bad_ablation_files_fail_with_one_line(tiny_experiment, tmp_path, spec, message):
    path = _ablation(tmp_path, **spec)
    if message is None:
        load_ablation(path)  # legal
        return
    with pytest.raises(ChimeraError, match=message):
        load_ablation(path)


def test_two_points_with_one_name_are_refused(tiny_experiment, tmp_path):
    path = _ablation(tmp_path, variants={"a": {}}, grid={"optim.lr": {"x": 1.0, "y": 2.0}})
    assert [v.name for v in load_ablation(path).variants] == ["a-x", "a-y"]
    path = _ablation(tmp_path, variants={"a": {}, "a-x": {}}, grid={"optim.lr": {"x": 1.0, "x-x": 2.0}})
    with pytest.raises(ChimeraError, match="two variants are named a-x-x"):
        load_ablation(path)


def test_command_line_sets_ablation_keys_or_adds_training_overrides(tiny_experiment, tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    other = _write(tmp_path / "sub" / "big.yaml", {"base": ["../tiny.yaml"]})
    path = _ablation(
        tmp_path, variants={"a": {"model.pooler.name": "identity"}}, overrides=["data.batch_size=4"]
    )
    monkeypatch.chdir(tmp_path / "sub")
    ab = load_ablation(path, ["base=big.yaml", "ablation=big_run", "seeds=[7]", "trainer.max_steps=3"])
    assert ab.name == "big_run" and ab.seeds == [7]
    assert ab.variant("a").base == other.resolve()  # relative to the working directory, not the file
    assert ab.overrides == ["data.batch_size=4", "trainer.max_steps=3"]  # the file's, then the command line's
    job = make_jobs(ab)[0]
    assert job.overrides == [
        "data.batch_size=4",
        "trainer.max_steps=3",
        "model.pooler.name=identity",
        "name=big_run-a-s7",
        "seed=7",
        "tracking.tags[chimera.ablation]=big_run",
        "tracking.tags[chimera.variant]=a",
        "tracking.tags[chimera.seed]=7",
    ]
    with pytest.raises(ChimeraError, match="cannot be set on the command line"):
        load_ablation(path, ["variants.a.optim.lr=1"])
    with pytest.raises(ChimeraError, match="sets name, seed"):
        load_ablation(path, ["seed=1"])


@pytest.mark.parametrize(
    "value",
    ["pool1d", "1e-3", "true", "null", "m*m-m", "hello world", "it's", "a\\b", "x: y", "${a.c}", 0.001, 3, True, None, [0.3, 0.45],
     ["connector.*", "decoder.*"], {"name": "scenes", "task": "position", "size": 8}, [{"name": "a", "x": [1, "b c", "it's"]}]],
)  # fmt: skip
def test_override_values_survive_the_command_line(value):
    from toolkit.config import parse_overrides

    text = format_value(value)
    back = parse_overrides([f"a.b={text}"])["a"]["b"]
    assert back == value and type(back) is type(value), (value, text, back)
    assert parse_overrides([f"tracking.tags[x.y]={text}"])["tracking"]["tags"]["x.y"] == value


def test_every_run_is_planned_with_its_identity_and_tags(tiny_experiment, tmp_path):
    from toolkit.plan import load_plan

    path = _ablation(tmp_path, variants={"p1": {"model.pooler.name": "pool1d", "model.pooler.stride": 2}})
    job = make_jobs(load_ablation(path, seeds=2))[1]
    plan = load_plan(job.variant.base, job.overrides)
    assert plan.name == "abl-p1-s1" and int(plan.cfg.seed) == 1
    assert plan.run_dir == tmp_path / "runs" / "abl-p1-s1"
    assert str(plan.cfg.model.pooler.name) == "pool1d"
    assert {k: plan.tags[k] for k in ("chimera.ablation", "chimera.variant", "chimera.seed")} == {
        "chimera.ablation": "abl",
        "chimera.variant": "p1",
        "chimera.seed": "1",
    }
    command = job.command(resume=True)
    assert command[:4] == [sys.executable, "-m", "toolkit.cli", "train"] and command[-1] == "--resume"


def test_dry_run_prints_one_parsable_train_command_per_run(tiny_experiment, tmp_path, capsys):
    import shlex

    from toolkit.cli import parser

    path = _ablation(tmp_path, variants={"a": {"model.pooler.name": "identity"}, "b": {}})
    assert run_ablation(path, dry_run=True, seeds=2) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    words = shlex.split(lines[1])
    assert words[:2] == ["chimera", "train"] and words[-1] == "--resume"
    args = parser().parse_args(words[1:])
    assert args.config == str(tiny_experiment.resolve()) and "name=abl-b-s0" in args.overrides
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    assert run_ablation(path, dry_run=True, only="a") == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_shipped_ablation_files_load(tmp_path):
    names = {p.stem for p in SHIPPED}
    assert {"token_compression", "backbone", "connector", "strategy", "base_tiny"} <= names
    for path in SHIPPED:
        if path.stem == "base_tiny":
            continue
        ab = load_ablation(path, [f"output_dir={tmp_path}"])
        assert ab.name == path.stem and len(ab.variants) >= 2 and ab.seeds == [0, 1]
        assert ab.variants[0].base == path.parent / "base_tiny.yaml"
        assert len(make_jobs(ab)) == 2 * len(ab.variants)


# -- skip / resume / lock ----------------------------------------------------------------------------------


def test_run_state_reads_run_json(tmp_path):
    run = tmp_path / "r"
    assert run_state(run) == NEW
    run.mkdir()
    assert run_state(run) == NEW  # a folder without run.json: a run that never started
    (run / "run.json").write_text(json.dumps({"tracking_uri": "x", "finished": False, "run_id": "abc"}))
    assert run_state(run) == PARTIAL and run_ids(run) == ["abc"]
    (run / "run.json").write_text(json.dumps({"finished": "yes"}))
    assert run_state(run) == PARTIAL  # only a JSON true counts
    (run / "run.json").write_text("{broken")
    assert run_state(run) == PARTIAL and run_ids(run) == []  # train reports the damage itself
    staged = {
        "finished": True,
        "parent_run_id": "p",
        "stages": {"a": {"run_id": "s1"}, "b": {"run_id": "s2"}},
    }
    (run / "run.json").write_text(json.dumps(staged))
    assert run_state(run) == FINISHED and run_ids(run) == ["p", "s1", "s2"]


def test_finished_and_locked_variants_are_skipped_without_training(tiny_experiment, tmp_path, capsys):
    """One variant finished earlier, one in use by a `chimera train`, one claimed by another ablate
    process: nothing is launched, each gets its note, and the sweep exits 0."""
    from toolkit.lock import RunLock

    path = _ablation(tmp_path, variants={"done": {}, "busy": {}, "claimed": {}})
    runs = tmp_path / "runs"
    (runs / "abl-done-s0").mkdir(parents=True)
    (runs / "abl-done-s0" / "run.json").write_text(json.dumps({"finished": True}))
    with RunLock(runs / "abl-busy-s0"), RunLock(runs / "abl-claimed-s0.ablate"):
        assert run_ablation(path) == 0
    out = capsys.readouterr().out
    assert "[1/3] done seed 0: finished earlier, skipped" in out
    assert (
        f"[2/3] busy seed 0: skipped: {runs / 'abl-busy-s0'} is in use by another run (pid {os.getpid()}"
        in out
    )
    assert (
        f"[3/3] claimed seed 0: skipped: another chimera ablate process is running it (pid {os.getpid()}"
        in out
    )
    assert "1/3 runs finished (1 earlier), 2 left to another process, 0 failed" in out
    assert not (runs / "ablations").exists()  # no training process was started (no log)


def test_a_run_folder_of_another_configuration_is_refused(tiny_experiment, tmp_path):
    from toolkit.config import to_yaml
    from toolkit.plan import load_plan

    path = _ablation(tmp_path, variants={"a": {"optim.lr": 0.01}})
    job = make_jobs(load_ablation(path))[0]
    plan = load_plan(job.variant.base, [*job.overrides[:-5], "optim.lr=0.02", *job.overrides[-5:]])
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "config.yaml").write_text(to_yaml(plan.cfg))
    (plan.run_dir / "run.json").write_text(json.dumps({"finished": True}))
    with pytest.raises(ChimeraError, match=r"another configuration \(optim.lr: 0.02 there, 0.01 now\)"):
        run_ablation(path)
    (plan.run_dir / "config.yaml").write_text(to_yaml(load_plan(job.variant.base, job.overrides).cfg))
    assert run_ablation(path) == 0  # the same configuration: finished, skipped


# -- a real sweep, killed and rerun ------------------------------------------------------------------------


def _driver_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", MLFLOW_ENABLE_ASYNC_LOGGING="false", PYTHONUNBUFFERED="1")
    return env


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _unlocked(run_dir: Path) -> bool:
    from toolkit.lock import RunLock

    try:
        RunLock(run_dir).acquire().release()
        return True
    except ChimeraError:
        return False


@pytest.mark.slow
def test_killed_ablate_rerun_finishes_only_the_missing_variants(tiny_experiment, tmp_path, capsys):
    """SIGKILL the sweep (its whole process group) once the first variant has finished and the second has
    started: the second variant's process is stopped too (it dies with its parent, after a checkpoint), and
    the rerun skips the first variant and continues the second in its own MLflow run."""
    from mlflow import MlflowClient

    path = _ablation(
        tmp_path,
        variants={"a": {"trainer.max_steps": 4}, "b": {"trainer.max_steps": 40}},
        overrides={"checkpoint.every_n_steps": 2, "trainer.val_check_interval": 4},
    )
    runs = tmp_path / "runs"
    first, second = runs / "abl-a-s0", runs / "abl-b-s0"
    code = f"import sys; from toolkit.ablation import run_ablation; sys.exit(run_ablation({str(path)!r}))"
    driver = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_driver_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(lambda: run_state(first) == FINISHED, 240, "the first variant to finish")
        _wait(
            lambda: bool(run_ids(second)) or driver.poll() is not None, 240, "the second variant's MLflow run"
        )
        assert driver.poll() is None, driver.stdout.read().decode()
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        out = driver.communicate(timeout=60)[0].decode()
    assert "[1/2] a seed 0: finished in" in out and "[2/2] b seed 0: training" in out
    _wait(lambda: _unlocked(second), 120, "the orphaned training process to stop")
    assert run_state(second) == PARTIAL
    first_state = (first / "run.json").read_text()

    assert run_ablation(path) == 0
    rerun = capsys.readouterr().out
    assert "[1/2] a seed 0: finished earlier, skipped" in rerun
    assert "[2/2] b seed 0: resuming from its checkpoint" in rerun and "[2/2] b seed 0: finished in" in rerun
    assert "2/2 runs finished (1 earlier), 0 left to another process, 0 failed" in rerun
    assert (first / "run.json").read_text() == first_state  # not trained again
    assert run_state(second) == FINISHED

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    by_variant: dict[str, list] = {}
    for r in client.search_runs(experiments, "tags.`chimera.ablation` = 'abl'"):
        if r.data.tags.get("chimera.summary") != "true":
            by_variant.setdefault(r.data.tags["chimera.variant"], []).append(r)
    assert sorted(by_variant) == ["a", "b"]
    assert [len(v) for v in by_variant.values()] == [1, 1]  # the second variant resumed into its own run
    b = by_variant["b"][0]
    assert b.info.status == "FINISHED" and b.data.tags["chimera.seed"] == "0"
    assert b.data.params["trainer.max_steps"] == "40" and b.data.params["checkpoint.every_n_steps"] == "2"
    assert int(b.data.params["total_params"]) > 0 and b.data.params["image_tokens"] == "4"
    steps = [m.step for m in client.get_metric_history(b.info.run_id, "train/loss")]
    assert max(steps) == 39


# -- the documentation's examples --------------------------------------------------------------------------

DOC = ROOT / "docs" / "ablations.md"


def _doc_blocks(lang: str) -> list[str]:
    import re

    return [
        m.group(2)
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", DOC.read_text(), re.M | re.S)
        if m.group(1) == lang
    ]


def test_documented_ablation_files_load(tmp_path):
    """Every ablation file shown in docs/ablations.md loads as written (base: relative to
    experiments/longllava/ablations/), and each of its variants plans."""
    import shutil

    from toolkit.plan import load_plan

    folder = tmp_path / "experiments"
    shutil.copytree(ROOT / "experiments", folder)
    found = 0
    for block in _doc_blocks("yaml"):
        spec = yaml.safe_load(block)
        if not isinstance(spec, dict) or not ({"variants", "grid"} & set(spec)):
            continue
        path = _write(folder / "longllava" / "ablations" / "doc_example.yaml", spec)
        ab = load_ablation(path, [f"output_dir={tmp_path / 'runs'}"])
        for job in make_jobs(ab)[: len(ab.variants)]:  # each variant once
            load_plan(job.variant.base, job.overrides, check_model=False)
        found += 1
    assert found >= 2


def test_documented_ablate_commands_plan(tmp_path, monkeypatch, capsys):
    """Every `chimera ablate` line of docs/ablations.md, run as --dry-run from the repository root."""
    import shlex

    monkeypatch.chdir(ROOT)
    commands = 0
    for block in _doc_blocks("bash"):
        for raw in block.splitlines():
            line = raw.split(" #")[0].split(" > ")[0].strip()
            if not line.startswith("chimera ablate "):
                continue
            words = shlex.split(line)[2:]
            file, rest = words[0], words[1:]
            seeds = int(rest[rest.index("--seeds") + 1]) if "--seeds" in rest else None
            only = rest[rest.index("--only") + 1] if "--only" in rest else None
            overrides = [w for w in rest if "=" in w and not w.startswith("-")]
            assert run_ablation(file, overrides, dry_run=True, seeds=seeds, only=only) == 0, line
            out = capsys.readouterr().out.splitlines()
            assert out and all(o.startswith("chimera train ") for o in out), line
            commands += 1
    assert commands >= 6


def test_a_bad_variant_fails_before_anything_runs(tiny_experiment, tmp_path, capsys):
    path = _ablation(tmp_path, variants={"ok": {}, "bad": {"model.pooler.strid": 2}})
    for dry_run in (True, False):
        with pytest.raises(ChimeraError, match=r"variant bad: .*model.pooler.strid"):
            run_ablation(path, dry_run=dry_run)
    assert capsys.readouterr().out == "" and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sigterm_to_a_parallel_sweep_stops_every_running_variant_with_a_checkpoint(tiny_experiment, tmp_path):
    """`--jobs 2`: two variants train at once; SIGTERM to `chimera ablate` is passed on once to both: each
    checkpoints and exits 143, so does the sweep, and the third variant is never started."""
    path = _ablation(
        tmp_path,
        variants={"a": {"trainer.max_steps": 400}, "b": {"trainer.max_steps": 400}, "c": {}},
        overrides={"checkpoint.every_n_steps": 200},
    )
    runs = [tmp_path / "runs" / f"abl-{v}-s0" for v in "ab"]
    code = (
        "import sys; from toolkit.ablation import run_ablation; "
        f"sys.exit(run_ablation({str(path)!r}, jobs=2))"
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_driver_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait(
            lambda: all(run_ids(r) for r in runs) or driver.poll() is not None,
            240,
            "both variants' MLflow runs",
        )
        time.sleep(2)
        driver.send_signal(signal.SIGTERM)
        out = driver.communicate(timeout=240)[0].decode()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 143, out
    assert "2 at a time, 1 thread(s) each" in out  # OMP_NUM_THREADS=1 set by the test's environment
    for i, variant in enumerate("ab", 1):
        assert f"[{i}/3] {variant} seed 0: stopped after" in out, out
        run = runs[i - 1]
        assert run_state(run) == PARTIAL and (run / "checkpoints" / "last.ckpt").is_file()
        log = (tmp_path / "runs" / "ablations" / "abl" / f"{variant}-s0.log").read_text()
        assert "stopped by SIGTERM at step" in log
    assert out.count("(exit 143); its checkpoint is kept") == 2
    assert "[3/3]" not in out and not (tmp_path / "runs" / "abl-c-s0").exists()


def test_parallel_runs_share_the_cores_unless_told(monkeypatch):
    from toolkit.ablation import _child_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert _child_env(2)["OMP_NUM_THREADS"] == "4" and _child_env(16)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in _child_env(1)  # one run at a time: torch's own default
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _child_env(2)["OMP_NUM_THREADS"] == "3"  # the user's setting wins
    with pytest.raises(ChimeraError, match="--jobs must be at least 1"):
        run_ablation("any.yaml", jobs=0)
