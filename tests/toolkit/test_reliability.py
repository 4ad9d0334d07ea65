"""Runs that cannot hurt each other or the user: run folders and locks, honest exits on signals, resume by
folder or MLflow run id, a fresh run that never deletes an earlier one. Kills run as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT
from toolkit.errors import ChimeraError
from toolkit.lock import RunLock

SLOW_TRAIN = """
import sys, time
import lightning.pytorch as pl
from toolkit import trainer as chimera_trainer

class Slow(pl.Callback):  # widen the window in which the test signals the run; the numbers do not change
    def on_train_batch_end(self, *args):
        time.sleep(0.4)

_make = chimera_trainer.make_trainer
def make_trainer(*args, callbacks=(), **kwargs):
    return _make(*args, callbacks=[*callbacks, Slow()], **kwargs)
chimera_trainer.make_trainer = make_trainer
from toolkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _experiment(tmp_path: Path, tiny_experiment: Path, **trainer) -> Path:
    cfg = yaml.safe_load(tiny_experiment.read_text())
    cfg["trainer"].update({"max_steps": 12, "val_check_interval": 100, **trainer})
    cfg["data"]["val"] = None
    cfg["checkpoint"] = {"every_n_steps": 100}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, *args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, "train", str(config), *args],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def _history(uri: str, run_id: str) -> dict[int, float]:
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")}


def _wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: " + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_marks_the_run_killed_exits_128_plus_signal_and_resumes_exactly(
    tmp_path, tiny_experiment, signum
):
    from mlflow import MlflowClient

    from toolkit.train import train

    torch.set_num_threads(1)
    config = _experiment(tmp_path, tiny_experiment)
    reference = train(config, ["name=reference"])
    ref = _history(reference.tracking_uri, reference.run_id)

    log = tmp_path / "run.log"
    proc = _start(config, "name=signalled", log=log)
    run_dir = tmp_path / "runs" / "signalled"

    def stepped() -> bool:
        state = run_dir / "run.json"
        if not state.exists():
            return False
        run_id = json.loads(state.read_text()).get("run_id")
        return bool(run_id) and len(_history(reference.tracking_uri, run_id)) >= 3

    _wait_for(stepped, proc, log, "three logged steps")
    proc.send_signal(signum)
    assert proc.wait(timeout=300) == 128 + signum, log.read_text()[-3000:]
    text = log.read_text()
    assert f"stopped by {signal.Signals(signum).name}" in text and "--resume" in text
    state = json.loads((run_dir / "run.json").read_text())
    assert state["finished"] is False and (run_dir / "checkpoints" / "last.ckpt").is_file()
    client = MlflowClient(reference.tracking_uri)
    assert client.get_run(state["run_id"]).info.status == "KILLED"
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= stopped_at < 12

    resumed = train(config, ["name=signalled"], resume=True)
    assert resumed.run_id == state["run_id"] and resumed.stages[0].global_step == 12
    losses = _history(reference.tracking_uri, resumed.run_id)
    assert set(losses) == set(ref)
    for step, value in losses.items():
        assert value == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step
    assert client.get_run(resumed.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_fails_at_once_naming_the_holder(tmp_path, tiny_experiment):
    # the holder trains until the test kills it: the second process may take a minute to start on a busy box
    config = _experiment(tmp_path, tiny_experiment, max_steps=100_000)
    log = tmp_path / "first.log"
    first = _start(config, "name=shared", log=log)
    try:
        lock = tmp_path / "runs" / ".shared.lock"
        _wait_for(lambda: lock.exists() and lock.read_text(), first, log, "the lock")
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "toolkit.cli", "train", str(config), "name=shared"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"pid {first.pid}" in out.stderr and "in use" in out.stderr
        assert time.monotonic() - t0 < 120
    finally:
        first.kill()
        first.wait()
    # the killed holder's lock is stale: the kernel released it, the next run takes it over
    with RunLock(tmp_path / "runs" / "shared"):
        pass


def test_lock_is_exclusive_and_released(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    with RunLock(run_dir), pytest.raises(ChimeraError, match=rf"in use by pid {os.getpid()}"):
        RunLock(run_dir).acquire()
    RunLock(run_dir).acquire().release()


@pytest.mark.slow
def test_a_fresh_run_moves_an_earlier_run_aside_and_resume_accepts_a_folder_or_a_run_id(
    tmp_path, tiny_experiment, capsys
):
    from toolkit.cli import main

    config = _experiment(tmp_path, tiny_experiment, max_steps=2)
    assert main(["train", str(config), "name=again"]) == 0
    run_dir = tmp_path / "runs" / "again"
    first_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert main(["train", str(config), "name=again"]) == 0
    aside = [p for p in run_dir.parent.iterdir() if p.name.startswith("again.prev-")]
    assert len(aside) == 1 and json.loads((aside[0] / "run.json").read_text())["run_id"] == first_id
    assert (aside[0] / "final.safetensors").is_file() and (aside[0] / "checkpoints" / "last.ckpt").is_file()
    second_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert second_id != first_id
    capsys.readouterr()

    # --resume RUN_FOLDER (no config, no overrides): a finished run stays finished
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == second_id
    # --resume MLFLOW_RUN_ID, looked up in the store named by $MLFLOW_TRACKING_URI
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    try:
        assert main(["train", "--resume", second_id]) == 0
        assert main(["train", "--resume", "0123456789abcdef"]) == 2
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    assert "no MLflow run with that id" in capsys.readouterr().err
    assert main(["train", str(config), "--resume", str(run_dir)]) == 2  # a run resumes with its own config


@pytest.mark.slow
def test_a_failed_resume_changes_nothing_on_disk(tmp_path, tiny_experiment, capsys):
    from toolkit.cli import main

    config = _experiment(tmp_path, tiny_experiment, max_steps=2)
    assert main(["train", str(config), "name=keep"]) == 0
    run_dir = tmp_path / "runs" / "keep"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    (run_dir / "run.json").write_text("{not json")
    before[run_dir / "run.json"] = b"{not json"
    capsys.readouterr()
    assert main(["train", str(config), "name=keep", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "run.json: damaged run state" in err and "move the run folder aside" in err
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("tracking.uri=http://127.0.0.1:9", "cannot reach"),
        ("output_dir=/etc/hostname/runs", "output_dir: cannot write to"),
    ],
)
def test_an_unusable_store_or_output_folder_fails_in_seconds_before_anything_is_built(
    tmp_path, tiny_experiment, capsys, monkeypatch, override, message
):
    """The preflight runs before the parts are built (the store check has its own 5 s timeout)."""
    from toolkit import assemble
    from toolkit.cli import main

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the preflight failed")

    monkeypatch.setattr(assemble, "build_parts", no_build)
    assert main(["train", str(tiny_experiment), override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.slow
def test_resume_skips_a_truncated_checkpoint_and_a_lost_mlflow_run_is_one_clear_line(
    tmp_path, tiny_experiment, capsys
):
    from toolkit.cli import main

    cfg = yaml.safe_load(_experiment(tmp_path, tiny_experiment, max_steps=4).read_text())
    cfg["checkpoint"] = {"every_n_steps": 2, "keep": -1}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(config), "name=damaged"]) == 0
    run_dir = tmp_path / "runs" / "damaged"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a torn write from some other tool
    state = json.loads((run_dir / "run.json").read_text())
    state["finished"] = False
    (run_dir / "run.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", str(config), "name=damaged", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {last}" in err and "step000004.ckpt" in err.split("resuming from")[1].splitlines()[0]

    state["run_id"] = "f" * 32  # a run the store does not hold
    state["finished"] = False
    (run_dir / "run.json").write_text(json.dumps(state))
    assert main(["train", str(config), "name=damaged", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not hold" in err and "f" * 32 in err and len(err.splitlines()) == 1
