"""MLflow store reliability: atomic creation of the embedded store, one-line errors for a half-built or
foreign store, a fast preflight for unreachable servers and unwritable directories, run lookup, terminal
statuses and best-over-history metrics."""

from __future__ import annotations

import fcntl
import http.server
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from toolkit import tracking
from toolkit.errors import ChimeraError


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One embedded store made by ``ensure_store`` (creating one takes seconds), shared by this module."""
    root = tmp_path_factory.mktemp("store")
    return tracking.ensure_store(f"sqlite:///{root / 'mlflow.db'}")


@pytest.fixture
def fresh_check():
    """``ensure_store`` checks a URI once per process; tests that re-check a store forget that."""
    yield
    tracking._ENSURED.clear()


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _copy_store(store: str, dest: Path) -> tuple[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "mlflow.db"
    shutil.copyfile(tracking.sqlite_path(store), path)
    return f"sqlite:///{path}", path


def _run(uri: str) -> str:
    c = _client(uri)
    experiment = c.get_experiment_by_name("tests")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else c.create_experiment("tests", artifact_location=tracking.artifact_location(uri))
    )
    return c.create_run(experiment_id, run_name=f"r-{uuid.uuid4().hex[:6]}").info.run_id


# -- ensure_store -----------------------------------------------------------------------------------------


def test_ensure_store_creates_a_complete_store_atomically(store, fresh_check):
    path = Path(tracking.sqlite_path(store))
    assert path.is_file() and path.name == "mlflow.db"
    assert (path.parent / "mlflow.db.lock").is_file()
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    head, expected, _ = tracking._expected_schema()
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()
    assert expected <= tables and "alembic_version" in tables
    tracking._ENSURED.clear()
    assert tracking.ensure_store(store) == store  # the check of an existing store accepts it
    run_id = _run(store)
    assert _client(store).get_run(run_id).info.status == "RUNNING"
    assert tracking.ensure_store("http://127.0.0.1:1") == "http://127.0.0.1:1"  # not a sqlite store


def _half_built(path: Path) -> None:
    """What a kill during MLflow's own creation leaves: the initial tables, no migrations."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    InitialBase.metadata.create_all(engine)
    engine.dispose()


def _unrelated_table(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (x INTEGER)")
    con.commit()
    con.close()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            _half_built,
            r"is incomplete \(schema revision none, MLflow [\d.]+ expects \w+; \d+ tables missing: ",
        ),
        (_unrelated_table, r"is incomplete \(schema revision none, .* tables missing: "),
        (lambda p: p.write_bytes(b"not a database " * 500), r"is not a readable SQLite database"),
    ],
    ids=["killed-mid-creation", "unrelated-table", "not-sqlite"],
)
def test_a_damaged_store_gives_one_clear_line_and_is_left_untouched(tmp_path, fresh_check, make, expected):
    path = tmp_path / "mlflow.db"
    make(path)
    before = path.read_bytes()
    with pytest.raises(ChimeraError, match=expected) as err:
        tracking.ensure_store(f"sqlite:///{path}")
    message = str(err.value)
    assert "\n" not in message and err.value.key == "tracking.uri"
    assert f"mv {path} {path}.broken" in message
    assert path.read_bytes() == before  # MLflow never opened it for writing


def test_a_store_at_another_schema_revision_is_reported(store, tmp_path, fresh_check):
    head, _, script = tracking._expected_schema()
    older = script.get_revision(head).down_revision
    uri, path = _copy_store(store, tmp_path / "older")
    con = sqlite3.connect(path)
    con.execute("UPDATE alembic_version SET version_num = ?", (older,))
    con.commit()
    con.close()
    with pytest.raises(ChimeraError, match=f"schema revision {older}, .*mlflow db upgrade {uri}"):
        tracking.ensure_store(uri)

    uri, path = _copy_store(store, tmp_path / "newer")
    con = sqlite3.connect(path)
    con.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    con.commit()
    con.close()
    with pytest.raises(ChimeraError, match="revision ffffffffffff, which MLflow .* does not know"):
        tracking.ensure_store(uri)


def test_an_empty_store_file_is_rebuilt_and_dead_temporaries_are_removed(
    store, tmp_path, monkeypatch, fresh_check
):
    created = []
    monkeypatch.setattr(tracking, "_create_store", lambda path: created.append(path))
    empty = tmp_path / "empty" / "mlflow.db"
    empty.parent.mkdir()
    empty.write_bytes(b"")  # sqlite's first open, then a kill
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = empty.parent / f".mlflow.db.tmp-{dead.pid}-abc123"  # a killed ensure_store's temporary
    stale.write_bytes(b"x")
    (empty.parent / f"{stale.name}-journal").write_bytes(b"x")
    tracking.ensure_store(f"sqlite:///{empty}")
    assert created == [str(empty)]
    assert sorted(p.name for p in empty.parent.iterdir()) == ["mlflow.db", "mlflow.db.lock"]

    uri, path = _copy_store(store, tmp_path / "alembic-only")
    con = sqlite3.connect(path)
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
        if name != "alembic_version":
            con.execute(f'DROP TABLE "{name}"')
    con.commit()
    con.close()
    tracking.ensure_store(uri)
    assert created[-1] == str(path)


KILLED_CREATOR = """
import sys, time
import mlflow.store.db.utils as db_utils
db_utils._upgrade_db = lambda engine: time.sleep(120)  # stop after the initial tables: the kill lands here
from toolkit import tracking
tracking.ensure_store(sys.argv[1])
"""


@pytest.mark.slow
def test_a_kill_during_creation_leaves_no_store_and_the_next_run_creates_it(tmp_path, fresh_check):
    from tests.conftest import ROOT

    path = tmp_path / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CREATOR, f"sqlite:///{path}"], cwd=tmp_path, env=env
    )
    deadline = time.monotonic() + 120

    def half_built() -> list[Path]:
        return [p for p in tmp_path.glob(".mlflow.db.tmp-*") if not p.name.endswith("-journal")]

    try:
        while not any(_tables(p) for p in half_built()):
            assert proc.poll() is None and time.monotonic() < deadline, "the creator never built its tables"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert not path.exists()  # never a half-built store under the real name
    (temporary,) = half_built()
    uri = tracking.ensure_store(f"sqlite:///{path}")  # the next run: creates the store, drops the leftover
    assert not temporary.exists() and path.is_file()
    assert _run(uri)


def _tables(path: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return len(con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall())
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_ensure_store_waits_for_another_creator_then_gives_up(tmp_path, fresh_check):
    path = tmp_path / "mlflow.db"
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is creating the store
    try:
        start = time.monotonic()
        with pytest.raises(ChimeraError, match=r"locked by another process .*mlflow\.db\.lock"):
            tracking.ensure_store(f"sqlite:///{path}", timeout_s=0.5)
        assert time.monotonic() - start < 3
    finally:
        os.close(fd)
    assert not path.exists()


# -- check_store ------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_store_fails_fast_on_an_unreachable_server():
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(ChimeraError) as err:
        tracking.check_store(f"http://127.0.0.1:{port}", timeout_s=2.0)
    assert time.monotonic() - start < 2.5
    assert str(err.value).startswith(
        f"tracking.uri: cannot reach MLflow server at http://127.0.0.1:{port} within 2 s: "
    )
    assert str(err.value).endswith("; start it or set tracking.uri to a sqlite:///... store")

    with pytest.raises(ChimeraError) as err:  # credentials never reach the message
        tracking.check_store(f"https://user:s3cret@127.0.0.1:{port}/prefix", timeout_s=2.0)
    assert "s3cret" not in str(err.value) and f"https://***@127.0.0.1:{port}/prefix" in str(err.value)


def test_check_store_gives_up_on_a_server_that_never_answers():
    with socket.socket() as listener:  # accepts connections (backlog), never reads or answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ChimeraError, match=f"at http://127.0.0.1:{port} within 1 s: "):
            tracking.check_store(f"http://127.0.0.1:{port}", timeout_s=1.0)
        assert time.monotonic() - start < 1.5


def test_check_store_accepts_a_server_that_answers():
    statuses = {"/health": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(statuses.get(self.path, 404))
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        tracking.check_store(uri, timeout_s=5.0)
        tracking.check_store(uri + "/", timeout_s=5.0)
        statuses["/health"] = 503  # a proxy in front of a dead server
        with pytest.raises(ChimeraError, match=r"HTTP 503 from .*/health"):
            tracking.check_store(uri, timeout_s=5.0)
    finally:
        server.shutdown()
        server.server_close()


def test_check_store_for_sqlite_and_file_stores(tmp_path):
    tracking.check_store(f"sqlite:///{tmp_path / 'new' / 'dir' / 'mlflow.db'}")  # created on demand
    assert (tmp_path / "new" / "dir").is_dir() and not any((tmp_path / "new" / "dir").iterdir())
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ChimeraError, match=r"tracking.uri: cannot create .*a-file.*Not a directory"):
        tracking.check_store(f"sqlite:///{blocker / 'runs' / 'mlflow.db'}")
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(ChimeraError, match="exists and is not a file"):
        tracking.check_store(f"sqlite:///{tmp_path / 'dir.db'}")
    for uri in (f"file://{tmp_path}/mlruns", str(tmp_path / "mlruns")):
        with pytest.raises(ChimeraError, match="file store, which MLflow 3 no longer supports"):
            tracking.check_store(uri)
    tracking.check_store("postgresql://user@db.invalid/mlflow")  # not checked: no network here
    tracking.check_store("sqlite://")  # in memory


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through 0o500 directories")
def test_check_store_refuses_a_read_only_directory(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ChimeraError, match="cannot write to .*ro"):
            tracking.check_store(f"sqlite:///{locked / 'mlflow.db'}")
    finally:
        locked.chmod(0o700)


# -- runs -------------------------------------------------------------------------------------------------


def test_run_exists(store, tmp_path):
    run_id = _run(store)
    assert tracking.run_exists(store, run_id)
    assert not tracking.run_exists(store, uuid.uuid4().hex)  # a run.json from another store
    for damaged in ("", None, "   ", "../../etc/passwd", "{not json"):
        assert not tracking.run_exists(store, damaged)
    _client(store).delete_run(run_id)
    assert not tracking.run_exists(store, run_id)  # deleted runs cannot be logged to
    gone = tmp_path / "moved" / "mlflow.db"
    assert not tracking.run_exists(f"sqlite:///{gone}", run_id) and not gone.parent.exists()


def test_run_dir_of_reads_the_run_folder_tag(store, tmp_path):
    c = _client(store)
    parent = _run(store)
    c.set_tag(parent, tracking.RUN_DIR_TAG, "/runs/recipe")
    child = c.create_run(
        c.get_run(parent).info.experiment_id, tags={"mlflow.parentRunId": parent}, run_name="stage"
    ).info.run_id
    assert tracking.run_dir_of(store, parent) == "/runs/recipe"
    assert tracking.run_dir_of(store, child) == "/runs/recipe"  # a stage's run finds its recipe's folder
    assert tracking.run_dir_of(store, _run(store)) is None  # not a Chimera run
    assert tracking.run_dir_of(store, uuid.uuid4().hex) is None
    missing = tmp_path / "none" / "mlflow.db"
    assert tracking.run_dir_of(f"sqlite:///{missing}", parent) is None and not missing.parent.exists()


def test_end_run_records_the_terminal_status(store):
    for status in ("FINISHED", "FAILED", "killed"):
        run_id = _run(store)
        tracking.end_run(store, run_id, status)
        assert _client(store).get_run(run_id).info.status == status.upper()
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracking.end_run(store, _run(store), "DONE")


def test_best_metric_reads_the_whole_history_not_the_last_value(store):
    run_id = _run(store)
    tracking.log_metrics(store, run_id, {"val/acc": 0.5, "train/loss": 3.0}, step=1)
    tracking.log_metrics(store, run_id, {"val/acc": 0.9, "train/loss": 1.0}, step=2)
    tracking.log_metrics(store, run_id, {"val/acc": 0.7, "train/loss": 2.0}, step=3)
    assert tracking.best_metric(store, run_id, "val/acc") == pytest.approx(0.9)
    assert tracking.best_metric(store, run_id, "train/loss", mode="min") == pytest.approx(1.0)
    assert tracking.best_metric(store, run_id, "val/acc", mode="min") == pytest.approx(0.5)
    assert tracking.best_metric(store, run_id, "never/logged") is None
    (found,) = _client(store).search_runs(
        [_client(store).get_run(run_id).info.experiment_id], f"attributes.run_id = '{run_id}'"
    )
    assert found.data.metrics["val/acc"] == pytest.approx(0.7)  # what search_runs reports: the last value
    with pytest.raises(ValueError, match="'max' or 'min'"):
        tracking.best_metric(store, run_id, "val/acc", mode="best")


def test_new_experiments_keep_artifacts_next_to_the_embedded_store(store, tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "name": "x",
            "output_dir": str(tmp_path),
            "tracking": {"uri": store, "experiment": "parents", "tags": {}},
        }
    )
    parent = tracking.start_parent_run(cfg, run_name="x", tags={"chimera.name": "x"})
    tracking.log_artifact_text(store, parent, "a: 1\n", "config.yaml")
    root = Path(tracking.sqlite_path(store)).parent / "mlartifacts"
    written = root / parent / "artifacts" / "config.yaml"  # runs are unique under one root
    assert written.read_text() == "a: 1\n"
    assert tracking.artifact_location("http://mlflow:5000") is None
    logger = tracking.make_logger(cfg, run_name="child", tags={})
    assert logger._artifact_location == root.as_uri()
