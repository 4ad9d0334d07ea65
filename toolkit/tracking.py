"""MLflow: the only module that talks to it. Store URI, curated params, config artifact, tags, run lookup.

MLflow 3's file store raises, so the default is an explicit embedded sqlite store under ``output_dir``
(``sqlite:///<abs>/mlflow.db``); ``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` point elsewhere. Params are
immutable and truncated at 250 characters, so a run logs a short flat param set (dotted keys) and uploads
the full resolved YAML as ``config.yaml``.

Reliability: ``check_store`` is a fast preflight (a sqlite store's directory is writable; a server answers
within seconds, where MLflow's own client retries for minutes). ``ensure_store`` creates a new embedded
sqlite store atomically (schema built in a temporary file next to it, then renamed into place, under a file
lock), so a kill during creation never leaves a half-built store; an existing store that is incomplete
(left by a kill under an older Chimera, or by another tool) is reported in one line instead of MLflow's
migration traceback. ``run_exists`` tells whether a recorded run id can still be logged to.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from toolkit.errors import ChimeraError

PARAM_KEYS = (
    "seed",
    "model.encoder.name",
    "model.encoder.model_name",
    "model.encoder.select_layer",
    "model.pooler.name",
    "model.pooler.stride",
    "model.connector.name",
    "model.connector.depth",
    "model.decoder.name",
    "model.decoder.d_model",
    "model.decoder.n_layers",
    "model.decoder.pattern",
    "model.decoder.ssm",
    "model.pool_after_connector",
    "data.train.name",
    "data.batch_size",
    "data.max_length",
    "optim.lr",
    "optim.weight_decay",
    "optim.warmup_steps",
    "optim.trainable",
    "trainer.max_steps",
    "trainer.accumulate_grad_batches",
    "trainer.precision",
    "trainer.devices",
    "trainer.num_nodes",
    "strategy.name",
    "strategy.activation_checkpointing",
)


def tracking_uri(cfg: Any) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store in ``output_dir``.

    Nothing is created here (``ensure_store`` creates the store when a run first needs it)."""
    uri = cfg.tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def _select(cfg: Any, dotted: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, dotted, default=None)


def flat_params(cfg: Any, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The curated param set: what differs between runs of an ablation, as short strings."""
    params = {}
    for key in PARAM_KEYS:
        value = _select(cfg, key)
        if value is not None:
            params[key] = str(value)[:250]
    for key, value in (extra or {}).items():
        params[key] = str(value)[:250]
    return params


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(cfg: Any, config_path: str | Path | None, overrides: list[str] | None = None) -> dict[str, str]:
    tags = {"chimera.name": str(cfg.name)}
    if config_path is not None:
        tags["chimera.experiment_file"] = str(config_path)
    if overrides:
        tags["chimera.overrides"] = " ".join(overrides)[:5000]
    commit = git_commit(Path(config_path).parent if config_path else None)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags.update({str(k): str(v) for k, v in (cfg.tracking.get("tags") or {}).items()})
    return tags


def make_logger(cfg: Any, *, run_name: str, tags: Mapping[str, str], run_id: str | None = None):
    """Lightning's MLFlowLogger with an explicit URI (its defaults crash on MLflow 3); an embedded store is
    created first (``ensure_store``)."""
    from lightning.pytorch.loggers import MLFlowLogger

    uri = ensure_store(tracking_uri(cfg))
    return MLFlowLogger(
        experiment_name=str(cfg.tracking.experiment),
        run_name=run_name,
        tracking_uri=uri,
        artifact_location=artifact_location(uri),
        tags=dict(tags),
        run_id=run_id,
        log_model=False,
    )


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of an embedded store keeps its artifacts: ``mlartifacts/`` next to the database
    (MLflow's default, ``./mlruns``, depends on the working directory); None for other stores (the server
    decides). Experiments that exist keep their location."""
    path = sqlite_path(uri)
    return Path(path).parent.joinpath("mlartifacts").as_uri() if path else None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_parent_run(cfg: Any, *, run_name: str, tags: Mapping[str, str]) -> str:
    """A parent run for a staged recipe; each stage logs to a child run under it."""
    uri = ensure_store(tracking_uri(cfg))
    c = client(uri)
    experiment = c.get_experiment_by_name(str(cfg.tracking.experiment))
    experiment_id = (
        experiment.experiment_id
        if experiment
        else c.create_experiment(str(cfg.tracking.experiment), artifact_location=artifact_location(uri))
    )
    return c.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id


def log_params(uri: str, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    c = client(uri)
    existing = c.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]  # params are immutable on resume
    if new:
        c.log_batch(run_id, params=new)


def log_artifact_text(uri: str, run_id: str, text: str, name: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        client(uri).log_artifact(run_id, str(path))


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    c = client(uri)
    for key, value in metrics.items():
        c.log_metric(run_id, key, float(value), step=step)


TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run terminated: ``FINISHED``, ``FAILED`` (an exception) or ``KILLED`` (interrupted)."""
    status = str(status).upper()
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"end_run: status must be one of {', '.join(TERMINAL_STATUSES)}, got {status!r}")
    client(uri).set_terminated(run_id, status=status)


def best_metric(uri: str, run_id: str, key: str, mode: str = "max") -> float | None:
    """Best value over a metric's history (``search_runs`` only returns the last value); None if never logged."""
    if mode not in ("max", "min"):
        raise ValueError(f"best_metric: mode must be 'max' or 'min', got {mode!r}")
    history = client(uri).get_metric_history(run_id, key)
    if not history:
        return None
    values = [m.value for m in history]
    return max(values) if mode == "max" else min(values)


def run_exists(uri: str, run_id: str | None) -> bool:
    """Whether ``run_id`` is an active run of the store at ``uri`` (one that can still be logged to).

    False for an id the store does not know (a run.json from another store, a damaged run.json, a malformed
    id) and for a deleted run; other failures (an unreachable server) raise.
    """
    from mlflow.exceptions import MlflowException

    if not isinstance(run_id, str) or not run_id.strip():
        return False
    path = sqlite_path(uri)
    if path is not None:
        if not os.path.isfile(path):
            return False  # the store was moved or deleted: do not create an empty one here
        ensure_store(uri)  # a damaged store: one clear line, not MLflow's migration traceback
    try:
        run = client(uri).get_run(run_id)
    except MlflowException as e:
        if getattr(e, "error_code", None) in (
            "RESOURCE_DOES_NOT_EXIST",
            "INVALID_PARAMETER_VALUE",
            "NOT_FOUND",
        ):
            return False
        raise
    return run.info.lifecycle_stage == "active"


RUN_DIR_TAG = "chimera.run_dir"


def run_dir_of(uri: str, run_id: str) -> str | None:
    """The run folder recorded on MLflow run ``run_id`` (its ``chimera.run_dir`` tag, or its parent run's), or
    None when the store does not hold such a run. A sqlite store that does not exist is not created."""
    if not run_exists(uri, run_id):  # never creates a sqlite store
        return None
    c = client(uri)
    tags = c.get_run(run_id).data.tags
    if RUN_DIR_TAG in tags:
        return tags[RUN_DIR_TAG]
    parent = tags.get("mlflow.parentRunId")
    if parent and run_exists(uri, parent):
        return c.get_run(parent).data.tags.get(RUN_DIR_TAG)
    return None


# --------------------------------------------------------------------------------------------- the store
_ENSURED: set[str] = set()  # sqlite stores this process has created or checked


def sqlite_path(uri: str) -> str | None:
    """The absolute file path of a ``sqlite:///PATH`` URI (``sqlite:////abs`` or a path relative to the
    working directory), or None for any other URI (in-memory sqlite included)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return os.path.abspath(path)


def _redact(uri: str) -> str:
    """The URI without credentials (``https://user:token@host`` -> ``https://***@host``)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()
    return uri


def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when the tracking store at ``uri`` cannot work; call it before a run starts.

    - ``sqlite:///PATH``: the directory exists (or is created) and is writable; an existing PATH is a
      writable file.
    - ``http(s)://``: the server answers ``GET /health`` within ``timeout_s`` (any HTTP answer below 500
      counts; MLflow's own client would retry for minutes).
    - a file store (``file:``, a plain path): refused, MLflow 3 no longer supports it.
    - anything else (databricks, a database server URL): not checked.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        if path is not None:
            _check_sqlite_writable(path)
    elif scheme in ("http", "https"):
        _check_server(uri, timeout_s)
    elif scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        raise ChimeraError(
            f"tracking.uri: '{_redact(uri)}' is an MLflow file store, which MLflow 3 no longer supports; "
            "set tracking.uri to a sqlite:///ABS/PATH/mlflow.db store or an http(s):// server",
            key="tracking.uri",
        )


def _check_sqlite_writable(path: str) -> None:
    directory = os.path.dirname(path)
    hint = "set tracking.uri to a sqlite:///... store in a writable directory"
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ChimeraError(
            f"tracking.uri: cannot create {directory} for the MLflow store {path}: {e.strerror or e}; {hint}",
            key="tracking.uri",
        ) from e
    if os.path.exists(path) and not os.path.isfile(path):
        raise ChimeraError(f"tracking.uri: {path} exists and is not a file; {hint}", key="tracking.uri")
    probe = os.path.join(directory, f".{os.path.basename(path)}.probe-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise ChimeraError(
            f"tracking.uri: cannot write to {directory} (the MLflow store's directory): {e.strerror or e}; {hint}",
            key="tracking.uri",
        ) from e
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    if os.path.isfile(path):
        try:
            with open(path, "r+b"):
                pass
        except OSError as e:
            raise ChimeraError(
                f"tracking.uri: cannot write to the MLflow store {path}: {e.strerror or e}; {hint}",
                key="tracking.uri",
            ) from e


def _check_server(uri: str, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    parts = urlsplit(uri)
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    url = parts._replace(netloc=netloc, query="", fragment="").geturl().rstrip("/") + "/health"
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                outcome["status"] = response.status
        except urllib.error.HTTPError as e:
            outcome["status"] = e.code
        except urllib.error.URLError as e:
            outcome["error"] = str(e.reason)
        except Exception as e:  # timeouts, resets, bad URLs
            outcome["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=probe, name="chimera-mlflow-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)  # the whole probe (DNS included) is bounded, not each socket operation
    if thread.is_alive():
        problem = "no answer"
    elif "error" in outcome:
        problem = outcome["error"]
    elif outcome.get("status", 0) >= 500:
        problem = f"HTTP {outcome['status']} from {_redact(uri).rstrip('/')}/health"
    else:
        return
    raise ChimeraError(
        f"tracking.uri: cannot reach MLflow server at {_redact(uri)} within {timeout_s:g} s: {problem}; "
        "start it or set tracking.uri to a sqlite:///... store",
        key="tracking.uri",
    )


@contextlib.contextmanager
def _file_lock(lock_path: str, timeout_s: float, what: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` (created if needed, never removed), waiting up to ``timeout_s``."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; creation is still atomic, only the race is unguarded
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ChimeraError(
                        f"tracking.uri: {what} is locked by another process ({lock_path}) for more than "
                        f"{timeout_s:g} s (another run is creating or checking it); try again once it has started",
                        key="tracking.uri",
                    ) from None
                time.sleep(0.1)
            except OSError:  # a filesystem without flock (some network mounts): go on unguarded
                locked = False
                break
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def ensure_store(uri: str, timeout_s: float = 120.0) -> str:
    """Make sure an embedded ``sqlite:///PATH`` store exists and is complete; returns ``uri``.

    A missing (or empty) store is created atomically: MLflow builds the schema in a temporary file next to
    PATH, which is then renamed to PATH, all under an exclusive lock on ``PATH.lock`` (waiting up to
    ``timeout_s``), so a kill leaves either no store or a complete one, and concurrent processes create it
    once. An existing store must be at the installed MLflow's schema revision with every table: otherwise
    (a store left half-built by a kill, a store of another MLflow version, not a database) it raises one
    ChimeraError line saying what to do. Other URIs are returned unchanged (see ``check_store``). Checked
    once per process and URI; call it on rank 0 only, before the first MLflow call of a run.
    """
    path = sqlite_path(uri)
    if path is None or (uri in _ENSURED and os.path.isfile(path)):
        return uri
    _check_sqlite_writable(path)
    with _file_lock(f"{path}.lock", timeout_s, f"the MLflow store {path}"):
        _remove_stale_store_temporaries(path)
        if not os.path.exists(path) or _is_empty_store(path):
            _create_store(path)
        else:
            _check_schema(uri, path)
    _ENSURED.add(uri)
    return uri


def _store_temporary_prefix(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-")


def _remove_stale_store_temporaries(path: str) -> None:
    """Temporary stores of killed ``ensure_store`` calls (``.NAME.tmp-PID-HEX`` and its journal)."""
    prefix = os.path.basename(_store_temporary_prefix(path))
    directory = os.path.dirname(path)
    for name in os.listdir(directory):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # still running (only possible without flock)
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError):
                continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))


def _connect_read_only(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=30)


def _is_empty_store(path: str) -> bool:
    """An empty file, or a database with no table but alembic's (what a kill before any DDL leaves)."""
    if os.path.getsize(path) == 0:
        return True
    try:
        con = _connect_read_only(path)
        try:
            names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return False  # reported by _check_schema
    return all(name.startswith("alembic_") for name in names)


def _create_store(path: str) -> None:
    """Build a store in a temporary file next to ``path`` and rename it into place."""
    tmp = f"{_store_temporary_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        store_client = client(f"sqlite:///{tmp}")
        store_client.search_experiments(max_results=1)  # creates every table and the Default experiment
        with contextlib.suppress(Exception):  # close pooled connections before the file moves
            store_client._tracking_client.store.engine.dispose()
        for suffix in ("-journal", "-wal"):
            if os.path.exists(tmp + suffix):
                raise RuntimeError(f"sqlite left {tmp + suffix} behind")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            fd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except ChimeraError:
        raise
    except Exception as e:
        raise ChimeraError(
            f"tracking.uri: cannot create the MLflow store {path}: {type(e).__name__}: {str(e).splitlines()[0]}",
            key="tracking.uri",
        ) from e
    finally:
        for leftover in (tmp, tmp + "-journal", tmp + "-wal", tmp + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _expected_schema() -> tuple[str | None, set[str], Any]:
    """(head revision, ORM table names, alembic ScriptDirectory or None) of the installed MLflow."""
    import mlflow.store.db.utils as db_utils  # imports every ORM model, as MLflow's own table check does
    from mlflow.store.db.base_sql_model import Base

    tables = set(Base.metadata.tables)
    try:
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(db_utils._get_alembic_config(db_url=""))
        heads = script.get_heads()
        return (heads[0] if len(heads) == 1 else None), tables, script
    except Exception:  # private MLflow API moved: check the tables only
        return None, tables, None


def _check_schema(uri: str, path: str) -> None:
    import mlflow

    move = f"move it aside (mv {path} {path}.broken) and run again to start a new store"
    try:
        con = _connect_read_only(path)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            revisions = (
                [r[0] for r in con.execute("SELECT version_num FROM alembic_version")]
                if "alembic_version" in tables
                else []
            )
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise ChimeraError(
            f"tracking.uri: the MLflow store {path} is not a readable SQLite database ({e}); {move}",
            key="tracking.uri",
        ) from e
    head, expected, script = _expected_schema()
    revision = revisions[0] if len(revisions) == 1 else None
    missing = sorted(expected - tables)
    if (head is None or revision == head) and not missing:
        return
    if revision is not None and script is not None:
        try:
            known = script.get_revision(revision) is not None
        except Exception:
            known = False
        if not known:
            raise ChimeraError(
                f"tracking.uri: the MLflow store {path} has schema revision {revision}, which MLflow "
                f"{mlflow.__version__} does not know (written by a newer MLflow?): upgrade mlflow, or set "
                "tracking.uri to another store",
                key="tracking.uri",
            )
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    detail = (
        f"schema revision {revision or 'none'}, MLflow {mlflow.__version__} expects {head or 'its latest'}"
    )
    if missing:
        detail += f"; {len(missing)} tables missing: {shown}"
    raise ChimeraError(
        f"tracking.uri: the MLflow store {path} is incomplete ({detail}): a run was probably killed while "
        f"it created the store; {move}, or, if it holds runs of an older MLflow, back it up and run "
        f"'mlflow db upgrade {uri}'",
        key="tracking.uri",
    )


# ------------------------------------------------------------------------------- ablations: runs read back
# ``toolkit.ablation`` and ``toolkit.report`` reach MLflow only through these functions and get plain data
# back (``RunRecord``, lists of tuples), so the tables are computed from stored runs, never from memory.

ABLATION_TAG = "chimera.ablation"
VARIANT_TAG = "chimera.variant"
SEED_TAG = "chimera.seed"
SUMMARY_TAG = "chimera.summary"


class RunRecord:
    """One MLflow run as plain data: ``metrics`` holds the LAST value of each metric (as ``search_runs``)."""

    def __init__(self, run: Any) -> None:
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.status: str = run.info.status
        self.start_time: int | None = run.info.start_time  # ms since the epoch
        self.end_time: int | None = run.info.end_time
        self.tags: dict[str, str] = dict(run.data.tags)
        self.params: dict[str, str] = dict(run.data.params)
        self.metrics: dict[str, float] = dict(run.data.metrics)
        self.run_name: str = run.info.run_name or self.tags.get("mlflow.runName", "")

    @property
    def wall_s(self) -> float | None:
        """Seconds from the run's start to its end (None while it runs)."""
        if self.start_time is None or self.end_time is None:
            return None
        return (self.end_time - self.start_time) / 1000.0

    @property
    def parent_id(self) -> str | None:
        return self.tags.get("mlflow.parentRunId") or None

    def __repr__(self) -> str:
        return f"RunRecord({self.run_id}, {self.run_name!r}, {self.status})"


def _filter_value(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ChimeraError(f"tag value {value!r}: quotes and backslashes cannot be searched for")
    return f"'{value}'"


def find_runs(uri: str, tags: Mapping[str, str]) -> list[RunRecord]:
    """Active runs, in every experiment of the store at ``uri``, whose tags equal ``tags`` (oldest first).

    A sqlite store that does not exist is not created: no runs."""
    path = sqlite_path(uri)
    if path is not None and not os.path.isfile(path):
        return []
    if path is not None:
        ensure_store(uri)
    c = client(uri)
    experiment_ids: list[str] = []
    token = None
    while True:
        page = c.search_experiments(max_results=1000, page_token=token)
        experiment_ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            break
    if not experiment_ids:
        return []
    where = " and ".join(f"tags.`{k}` = {_filter_value(str(v))}" for k, v in tags.items())
    runs: list[RunRecord] = []
    token = None
    while True:
        page = c.search_runs(experiment_ids, filter_string=where, max_results=1000, page_token=token)
        runs += [RunRecord(r) for r in page]
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (r.start_time or 0, r.run_id))


def get_run_record(uri: str, run_id: str) -> RunRecord | None:
    """The run ``run_id`` as a ``RunRecord``, or None when the store does not hold it."""
    if not run_exists(uri, run_id):
        return None
    return RunRecord(client(uri).get_run(run_id))


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float, int]]:
    """Every logged value of ``key`` in run ``run_id``: ``(step, value, timestamp_ms)`` in step order."""
    history = client(uri).get_metric_history(run_id, key)
    return sorted((int(m.step), float(m.value), int(m.timestamp)) for m in history)


def set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value))


def log_artifact_file(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def override_params(overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """A run's command-line overrides as params: ``{"model.pooler.name": "pool1d"}`` from
    ``model.pooler.name=pool1d`` (the text after ``=``, at most 250 characters). ``name``, ``seed`` and
    tracking tags are left out (the run name, the ``seed`` param and the tags already say them)."""
    params: dict[str, str] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key or key in ("name", "seed") or key.startswith("tracking.tags"):
            continue
        params[key[:250]] = value[:250]
    return params


def summary_run(uri: str, experiment: str, ablation: str, tags: Mapping[str, str] | None = None) -> str:
    """The summary run of ablation ``ablation`` (tags ``chimera.ablation=<name>``, ``chimera.summary=true``),
    created in ``experiment`` the first time; ``tags`` are set on it each call. Tables and plots are stored
    as its artifacts. Two processes asking at once get the same run (a file lock next to a sqlite store)."""
    uri = ensure_store(uri)
    path = sqlite_path(uri)
    lock = (
        _file_lock(f"{path}.summary.lock", 120.0, f"the summary run of {ablation}")
        if path
        else contextlib.nullcontext()
    )
    with lock:
        found = find_runs(uri, {ABLATION_TAG: ablation, SUMMARY_TAG: "true"})
        if found:
            run_id = found[0].run_id
        else:
            c = client(uri)
            exp = c.get_experiment_by_name(experiment)
            experiment_id = (
                exp.experiment_id
                if exp
                else c.create_experiment(experiment, artifact_location=artifact_location(uri))
            )
            run_id = c.create_run(
                experiment_id,
                run_name=f"{ablation}-summary",
                tags={ABLATION_TAG: ablation, SUMMARY_TAG: "true"},
            ).info.run_id
            c.set_terminated(run_id, status="FINISHED")
    if tags:
        set_tags(uri, run_id, tags)
    return run_id


def experiment_name(uri: str, experiment_id: str) -> str:
    """The name of experiment ``experiment_id`` of the store at ``uri``."""
    return client(uri).get_experiment(experiment_id).name
