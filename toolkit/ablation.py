"""``chimera ablate``: an ablation file -> one training process per variant and seed -> MLflow runs.

An ablation file names a base experiment and its variants, as named override sets, a grid over axes, or both
(each named variant crossed with every grid point)::

    ablation: token_compression            # optional; default: the file's stem
    base: base_tiny.yaml                    # the experiment every variant starts from (relative to this file)
    seeds: 1                                # N (seeds 0..N-1) or a list [0, 1]; `--seeds N` overrides
    overrides:                              # applied to every variant: dotted keys, YAML values
      data.train: {name: scenes, task: position, size: 8000}
    baseline: none                          # the row the table's deltas are taken to (default: the first)
    metrics: [val/acc:final, val/acc:best]  # the table's default metric columns (toolkit.report)
    variants:                               # named override sets; `base:` picks another experiment file
      none:   {model.pooler.name: identity}
      pool1d: {model.pooler.name: pool1d, model.pooler.stride: 4}
    grid:                                   # every combination of the axes: a list of values, or
      optim.lr: [1.0e-3, 3.0e-3]            #   {label: value} for readable variant names

Each (variant, seed) trains in a process of its own (Lightning's launchers and MLflow keep process-global
state)::

    python -m toolkit.cli train BASE OVERRIDES... VARIANT_OVERRIDES... name=<ablation>-<variant>-s<seed>
        seed=<seed> tracking.tags[chimera.ablation]=<ablation> tracking.tags[chimera.variant]=<variant>
        tracking.tags[chimera.seed]=<seed>

so every MLflow run carries the ablation, variant and seed tags; the variant's overrides (and the model's
``total_params`` and ``image_tokens``) are added to the run's params when it ends. A sweep resumes where it
stopped: a variant whose ``run.json`` says finished is skipped, an unfinished one continues from its newest
checkpoint (``--resume``), in the same MLflow run. Two ``chimera ablate`` processes on one file share the work:
a variant whose run folder is in use (the run lock, ``toolkit.lock``, or another ablate process's claim on
it) is skipped with a note, and the process holding it finishes it. ``--dry-run`` prints one ``chimera
train`` command per run instead (idempotent with ``--resume``: for a scheduler's job array).

The table and the plots are read back from MLflow by ``toolkit.report``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ChimeraError, did_you_mean

FILE_KEYS = ("ablation", "base", "seeds", "overrides", "baseline", "metrics", "variants", "grid")
CLI_KEYS = ("ablation", "base", "seeds", "baseline", "metrics")  # ablation keys a command line may set
RESERVED = ("name", "seed")  # set per run by the ablation itself
DEFAULT_METRICS = ("val/acc:final", "val/acc:best", "val/loss:final")
ABLATION_TAG, VARIANT_TAG, SEED_TAG = "chimera.ablation", "chimera.variant", "chimera.seed"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*")
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_./*-]*")
_KEYWORDS = {"true", "false", "null", "none", "inf", "nan", "yes", "no", "on", "off"}


@dataclass
class Variant:
    name: str
    index: int  # position in the ablation (the table's row order)
    overrides: list[str]  # key=value, in the order they apply
    base: Path  # the experiment file it trains


@dataclass
class Ablation:
    name: str
    path: Path | None
    variants: list[Variant]
    seeds: list[int]
    baseline: str
    metrics: list[str]
    overrides: list[str] = field(default_factory=list)  # every variant's: the file's, then the command line's

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        names = [v.name for v in self.variants]
        raise ChimeraError(
            f"{self.path or self.name}: no variant '{name}'{did_you_mean(name, names)}; variants: "
            f"{', '.join(names)}"
        )


@dataclass
class Job:
    """One training run of the ablation: a variant with one seed."""

    ablation: Ablation
    variant: Variant
    seed: int

    @property
    def run_name(self) -> str:
        return f"{self.ablation.name}-{self.variant.name}-s{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}"

    @property
    def overrides(self) -> list[str]:
        """Every override of this run: the ablation's, the variant's, then its identity and tags."""
        return [
            *self.ablation.overrides,
            *self.variant.overrides,
            f"name={self.run_name}",
            f"seed={self.seed}",
            f"tracking.tags[{ABLATION_TAG}]={self.ablation.name}",
            f"tracking.tags[{VARIANT_TAG}]={self.variant.name}",
            f"tracking.tags[{SEED_TAG}]={self.seed}",
        ]

    def command(self, launcher: Sequence[str] | None = None, *, resume: bool = False) -> list[str]:
        """The ``train`` command line; ``launcher`` defaults to this interpreter's ``-m toolkit.cli``."""
        launcher = list(launcher) if launcher is not None else [sys.executable, "-m", "toolkit.cli"]
        return [*launcher, "train", _shown_path(self.variant.base), *self.overrides] + (
            ["--resume"] if resume else []
        )


# ---------------------------------------------------------------------------------------- the file


def load_ablation(path: str | Path, overrides: Sequence[str] = (), *, seeds: int | None = None) -> Ablation:
    """Read and check an ablation file. ``overrides``: ``key=value`` from the command line, either ablation
    keys (``base``, ``seeds``, ``baseline``, ``metrics``, ``ablation``; a ``base`` given here is relative to
    the working directory) or training overrides added to every variant. ``seeds``: ``--seeds N`` (0..N-1)."""
    from toolkit.config import _read_yaml, parse_overrides

    path = Path(path)
    where = str(path)
    spec = _read_yaml(path)
    unknown = [k for k in spec if k not in FILE_KEYS]
    if unknown:
        raise ChimeraError(
            f"{where}: {unknown[0]}: unknown key{did_you_mean(unknown[0], FILE_KEYS)}; an ablation file has "
            f"{', '.join(FILE_KEYS)} (training settings go under overrides: or into the base experiment)"
        )
    base_dir = path.resolve().parent
    train_overrides: list[str] = []
    for item in overrides:
        key = str(item).partition("=")[0].strip()
        if key in CLI_KEYS:
            value = parse_overrides([item])[key]
            if key == "base":
                value = str(Path(str(value)).resolve())  # the command line's paths are the shell's
            spec[key] = value
        elif key in FILE_KEYS or key.split(".")[0] in ("variants", "grid", "overrides"):
            raise ChimeraError(
                f"command line: {item}: '{key}' cannot be set on the command line; edit {where} (the command "
                f"line may set {', '.join(CLI_KEYS)}, or add training overrides key=value)"
            )
        else:
            train_overrides.append(str(item))
    _check_overrides(train_overrides, "command line")

    name = str(spec.get("ablation") or path.stem)
    if not _NAME.fullmatch(name):
        raise ChimeraError(
            f"{where}: ablation: '{name}' must be a safe folder name (letters, digits, ._=,+-)"
        )
    if not spec.get("base"):
        raise ChimeraError(f"{where}: base: missing; name the experiment file every variant starts from")
    base = _existing(base_dir / str(spec["base"]), f"{where}: base")
    common = _as_overrides(spec.get("overrides"), f"{where}: overrides") + train_overrides

    named = spec.get("variants")
    grid = spec.get("grid")
    if not named and not grid:
        raise ChimeraError(f"{where}: no variants: add variants: (named override sets) or grid: (axes)")
    if named is not None and not isinstance(named, Mapping):
        raise ChimeraError(f"{where}: variants: expected a mapping of variant names to override sets")
    rows: list[tuple[str, list[str], Path]] = []
    for vname, node in (named or {None: None}).items():
        vbase = base
        if vname is not None:
            vname = str(vname)
            if not _NAME.fullmatch(vname):
                raise ChimeraError(
                    f"{where}: variants: '{vname}' must be a safe folder name (letters, digits, ._=,+-)"
                )
            if isinstance(node, Mapping) and node.get("base"):
                vbase = _existing(base_dir / str(node["base"]), f"{where}: variants.{vname}.base")
                node = {k: v for k, v in node.items() if k != "base"}
        vover = _as_overrides(node, f"{where}: variants.{vname}") if vname is not None else []
        for label, gover in expand_grid(grid, f"{where}: grid") if grid else [(None, [])]:
            full = "-".join(x for x in (vname, label) if x)
            rows.append((full, vover + gover, vbase))
    names = [r[0] for r in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ChimeraError(f"{where}: two variants are named {duplicates[0]}")
    variants = [Variant(n, i, o, b) for i, (n, o, b) in enumerate(rows)]

    baseline = str(spec.get("baseline") or variants[0].name)
    if baseline not in names:
        raise ChimeraError(
            f"{where}: baseline: no variant '{baseline}'{did_you_mean(baseline, names)}; variants: "
            f"{', '.join(names)}"
        )
    metrics = spec.get("metrics") or list(DEFAULT_METRICS)
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        raise ChimeraError(f"{where}: metrics: expected a list like [val/acc:final, val/acc:best]")
    return Ablation(
        name=name,
        path=path,
        variants=variants,
        seeds=_seeds(spec.get("seeds", 1), f"{where}: seeds") if seeds is None else _seeds(seeds, "--seeds"),
        baseline=baseline,
        metrics=[str(m) for m in metrics],
        overrides=common,
    )


def _existing(path: Path, where: str) -> Path:
    path = path.resolve()
    if not path.is_file():
        raise ChimeraError(f"{where}: experiment file {path} not found")
    return path


def _seeds(value: Any, where: str) -> list[int]:
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if ok(value) and value >= 1:
        return list(range(value))
    if isinstance(value, list) and value and all(ok(v) for v in value) and len(set(value)) == len(value):
        return list(value)
    raise ChimeraError(
        f"{where}: expected a count >= 1 (seeds 0..N-1) or a list of distinct seeds, got {value!r}"
    )


def format_value(value: Any) -> str:
    """A YAML value as OmegaConf dotlist text: ``pool1d``, ``0.001``, ``[a, b]``, ``{name: scenes, size: 8}``,
    ``'1e-3'`` (a string that would otherwise read as a number is quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _BARE.fullmatch(value) and value.lower() not in _KEYWORDS:
            return value
        return "'" + value.replace("'", "''") + "'"  # YAML's single-quoted style (dotlist values are YAML)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise ChimeraError(f"cannot write {value!r} ({type(value).__name__}) as an override value")


def _as_overrides(node: Any, where: str) -> list[str]:
    """An override set: a mapping of dotted keys to YAML values, or a list of ``key=value`` strings."""
    from toolkit.config import parse_overrides

    if node is None:
        return []
    if isinstance(node, Mapping):
        out = []
        for key, value in node.items():
            text = f"{key}={format_value(value)}"
            back = _at(parse_overrides([text]), str(key))
            if back != value:
                raise ChimeraError(
                    f"{where}: {key}: the value {value!r} does not survive the command line (reads back "
                    f"as {back!r}); write it as a key=value string in a list"
                )
            out.append(text)
    elif isinstance(node, list) and all(isinstance(x, str) for x in node):
        out = [str(x) for x in node]
    else:
        raise ChimeraError(
            f"{where}: expected a mapping of dotted keys to values, or a list of key=value strings"
        )
    _check_overrides(out, where)
    return out


def _at(node: Any, key: str) -> Any:
    """The value at dotted ``key`` (``a.b``, ``a[b.c]``) of parsed overrides, interpolations unresolved."""
    for part in (a or b for a, b in re.findall(r"\[([^\]]+)\]|([^.\[\]]+)", key)):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _check_overrides(overrides: Sequence[str], where: str) -> None:
    from toolkit.config import parse_overrides

    for item in overrides:
        try:
            parsed = parse_overrides([item])
        except ChimeraError as exc:
            raise ChimeraError(f"{where}: {str(exc).partition(': ')[2]}") from exc
        key = str(item).partition("=")[0].strip()
        if key in RESERVED or str(item).startswith("tracking.tags["):
            raise ChimeraError(
                f"{where}: {item}: the ablation sets name, seed and its tags itself (use seeds: or --seeds)"
            )
        if "tracking" in parsed and "tags" in (parsed["tracking"] or {}):
            tags = parsed["tracking"]["tags"] or {}
            if "chimera" in tags:
                raise ChimeraError(f"{where}: {item}: chimera.* tags are the ablation's own")


def expand_grid(grid: Any, where: str) -> list[tuple[str, list[str]]]:
    """The grid's points as ``(name, overrides)``, in order (the last axis varies fastest).

    An axis is ``dotted.key: [v1, v2]`` (points named ``leaf=v1``; a key ending in ``.name`` is named by its
    node, ``model.connector.name: [linear]`` -> ``connector=linear``) or ``dotted.key: {label: value}``.
    Axis names join with ``,``: ``connector=linear,lr=0.001``."""
    if not isinstance(grid, Mapping) or not grid:
        raise ChimeraError(f"{where}: expected a mapping of dotted keys to lists of values")
    axes: list[tuple[str, list[tuple[str | None, Any]]]] = []
    for key, values in grid.items():
        key = str(key)
        if isinstance(values, Mapping) and values:
            items = [(str(label), v) for label, v in values.items()]
            for label, _ in items:
                if not _NAME.fullmatch(label):
                    raise ChimeraError(f"{where}.{key}: label '{label}' must be a safe folder name")
        elif isinstance(values, list) and values:
            items = [(None, v) for v in values]
        else:
            raise ChimeraError(f"{where}.{key}: expected a non-empty list of values (or {{label: value}})")
        axes.append((key, items))
    shorts = _short_names([k for k, _ in axes])
    points = []
    for combo in itertools.product(*(items for _, items in axes)):
        labels, overrides = [], []
        for (key, _), short, (label, value) in zip(axes, shorts, combo):
            labels.append(label if label is not None else _safe(f"{short}={_label(value)}"))
            overrides += _as_overrides({key: value}, f"{where}.{key}")
        points.append((",".join(labels), overrides))
    return points


def _short_names(keys: list[str]) -> list[str]:
    def short(key: str) -> str:
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    shorts = [short(k) for k in keys]
    return [s if shorts.count(s) == 1 else k for s, k in zip(shorts, keys)]


def _label(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def _safe(text: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    return safe if safe[:1].isalnum() else f"v{safe}"


def _shown_path(path: Path) -> str:
    """A path as a command shows it: relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def make_jobs(ablation: Ablation, only: Sequence[str] | str | None = None) -> list[Job]:
    """Every (variant, seed) run, seed by seed (a sweep that dies early leaves whole seeds behind);
    ``only``: variant names (``--only``)."""
    if isinstance(only, str):
        only = [only]
    chosen = [ablation.variant(n) for n in only] if only else list(ablation.variants)
    return [Job(ablation, v, s) for s in ablation.seeds for v in chosen]


# ------------------------------------------------------------------------------------------- the runs

FINISHED, PARTIAL, NEW = "finished", "partial", "new"


def run_state(run_dir: Path) -> str:
    """``finished`` (run.json says so: skip), ``partial`` (run.json without finished: --resume) or ``new``."""
    from toolkit.plan import RUN_STATE

    path = Path(run_dir) / RUN_STATE
    if not path.is_file():
        return NEW
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return PARTIAL  # train reports a damaged run.json itself, with what to do
    return FINISHED if isinstance(data, dict) and data.get("finished") is True else PARTIAL


def run_ids(run_dir: Path) -> list[str]:
    """The MLflow runs recorded in a run folder's run.json: the run (or the parent and one per stage)."""
    from toolkit.plan import RUN_STATE

    try:
        data = json.loads((Path(run_dir) / RUN_STATE).read_text())
    except (OSError, ValueError):
        return []
    ids = [data.get("run_id"), data.get("parent_run_id")]
    ids += [s.get("run_id") for s in (data.get("stages") or {}).values() if isinstance(s, dict)]
    return [i for i in ids if isinstance(i, str) and i]


def check(jobs: Sequence[Job]) -> None:
    """Plan each variant once without building a model (keys, values, component arguments): a dry run's
    commands are known to start."""
    from toolkit.plan import load_plan

    seen = set()
    for job in jobs:
        if job.variant.name in seen:
            continue
        seen.add(job.variant.name)
        try:
            load_plan(job.variant.base, job.overrides, check_model=False)
        except ChimeraError as exc:
            raise ChimeraError(f"variant {job.variant.name}: {exc}", key=exc.key) from exc


@dataclass
class Prepared:
    """What the driver knows about a job before it runs: its plan's run folder, store and model facts."""

    job: Job
    run_dir: Path
    tracking_uri: str
    experiment: str
    params: dict[str, str]  # logged on the run(s) when they end: overrides, total_params, image_tokens


def prepare(jobs: Sequence[Job]) -> list[Prepared]:
    """Plan every job before anything runs (a bad variant fails the sweep in seconds, naming the file and
    key): each variant's model is built once on the meta device (parameter count, image tokens), and a run
    folder that holds a run of another configuration (the base or the overrides changed) is refused."""
    from toolkit import tracking
    from toolkit.describe import describe
    from toolkit.plan import load_plan

    facts: dict[str, dict[str, str]] = {}
    out = []
    for job in jobs:
        try:
            plan = load_plan(job.variant.base, job.overrides, check_model=False)
        except ChimeraError as exc:
            raise ChimeraError(f"variant {job.variant.name}: {exc}", key=exc.key) from exc
        if job.variant.name not in facts:
            try:
                info = describe(plan)
            except ChimeraError as exc:
                raise ChimeraError(f"variant {job.variant.name}: {exc}", key=exc.key) from exc
            facts[job.variant.name] = {
                "total_params": str(info["params"]["total"]),
                "image_tokens": str(info["image_tokens"]),
            }
        _check_same_config(plan, job)
        params = {**tracking.override_params(job.overrides), **facts[job.variant.name]}
        out.append(Prepared(job, plan.run_dir, plan.tracking_uri, plan.experiment, params))
    return out


def _check_same_config(plan: Any, job: Job) -> None:
    from omegaconf import OmegaConf

    from toolkit.plan import RESOLVED_CONFIG

    stored = plan.run_dir / RESOLVED_CONFIG
    if run_state(plan.run_dir) == NEW or not stored.is_file():
        return
    old = _flat(OmegaConf.to_container(OmegaConf.load(stored), resolve=False))
    new = _flat(OmegaConf.to_container(plan.cfg, resolve=True))
    for key in sorted(set(old) & set(new)):  # keys a newer Chimera added are not a change
        if old[key] != new[key] and not _same_number(old[key], new[key]):
            raise ChimeraError(
                f"{plan.run_dir} holds a run of another configuration ({key}: {old[key]!r} there, "
                f"{new[key]!r} now): the ablation's base or overrides changed since it ran. Give this "
                f"sweep its own name (chimera ablate FILE ablation=NEW_NAME ...) or move the folder aside"
            )


def _same_number(a: Any, b: Any) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out[prefix] = node
    return out


def log_params(prepared: Prepared) -> None:
    """Add the variant's overrides, ``total_params`` and ``image_tokens`` to its MLflow run(s) (params never
    change: keys a run already has are kept)."""
    from toolkit import tracking

    for run_id in run_ids(prepared.run_dir):
        if tracking.run_exists(prepared.tracking_uri, run_id):
            tracking.log_params(prepared.tracking_uri, run_id, prepared.params)


# -------------------------------------------------------------------------------------------- driver


def run_ablation(
    file: str | Path,
    overrides: Sequence[str] = (),
    *,
    dry_run: bool = False,
    only: Sequence[str] | str | None = None,
    seeds: int | None = None,
    jobs: int = 1,
) -> int:
    """``chimera ablate FILE [key=value ...] [--dry-run] [--only V] [--seeds N] [--jobs J]``; returns the exit
    code.

    0: every run finished (here or before) or is being run by another process; 128 + N when stopped by
    signal N (the running variants are stopped after a checkpoint; rerun to continue); otherwise the exit code
    of the first run that failed (the sweep goes on with the others first). ``jobs``: runs trained at the same
    time, each in its own process (on a CPU each gets ``cpu_count // jobs`` threads unless
    ``OMP_NUM_THREADS`` is set)."""
    if jobs < 1:
        raise ChimeraError(f"--jobs must be at least 1, got {jobs}", key="--jobs")
    ablation = load_ablation(file, overrides, seeds=seeds)
    runs = make_jobs(ablation, only)
    if dry_run:
        check(runs)
        for job in runs:
            print(shlex.join(job.command(["chimera"], resume=True)))
        return 0
    try:
        return _sweep(ablation, prepare(runs), file, jobs)
    except KeyboardInterrupt:  # Ctrl+C while planning
        _print(f"\nchimera: ablation {ablation.name}: interrupted; run the same command again to continue")
        return 128 + signal.SIGINT


def _sweep(ablation: Ablation, prepared: list[Prepared], file: str | Path, jobs: int) -> int:
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    children = _Children(_child_env(jobs))
    _announce(ablation, prepared, jobs, children.env.get("OMP_NUM_THREADS"))
    n = len(prepared)
    counts = {"finished": 0, "skipped": 0, "elsewhere": 0, "failed": 0}
    codes: list[int] = []
    # Runs start in file order (seed by seed); each worker thread waits on one training process. Signals are
    # taken here, in the main thread, and passed on to every running process (see _Children).
    with children.handling_signals(), ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = {
            pool.submit(_run_one, item, f"chimera: [{i}/{n}] {item.job.label}", children)
            for i, item in enumerate(prepared, 1)
        }
        while pending:  # short waits: the main thread stays free to run the signal handler
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                code, outcome = future.result()
                codes.append(code)
                if outcome:
                    counts[outcome] += 1
    if children.received:
        _print(f"chimera: ablation {ablation.name}: stopped; run the same command again to continue")
        return 128 + children.received[0]
    first_failure = next((c for c in codes if c), 0)
    done_runs = counts["finished"] + counts["skipped"]
    _print(
        f"chimera: ablation {ablation.name}: {done_runs}/{n} runs finished ({counts['skipped']} earlier), "
        f"{counts['elsewhere']} left to another process, {counts['failed']} failed"
    )
    if done_runs:
        same_name = load_ablation(file).name == ablation.name  # else: ablation=NEW on the command line
        target = _shown_path(Path(file)) if same_name else ablation.name
        _print(f"chimera: table: chimera table {target}   plot: chimera plot {target}")
    return first_failure


def _child_env(jobs: int) -> dict[str, str]:
    """The training processes' environment: unbuffered output, and with parallel runs on a CPU, the cores
    shared out (two processes of 2 OpenMP threads each on 2 cores spin-wait on each other: 10-50x slower)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


class _Children:
    """The training processes a sweep runs, and the signal that stops them.

    The first SIGINT or SIGTERM is passed on to every running process once (each stops after its current step
    with a checkpoint and exits 128 + N) and no further run starts; a second one kills them. The children have
    sessions of their own, so a Ctrl+C in the terminal reaches them only through here, once."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.received: list[int] = []
        self._live: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def start(self, command: list[str], out: Any) -> subprocess.Popen | None:
        """The started process, or None once the sweep was told to stop."""
        with self._lock:
            if self.received:
                return None
            child = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            self._live.add(child)
            return child

    def wait(self, child: subprocess.Popen) -> int:
        code = child.wait()
        with self._lock:
            self._live.discard(child)
        return code

    def _forward(self, signum: int, frame: Any) -> None:
        with self._lock:
            if self.received:  # a second signal: stop at once
                for child in self._live:
                    child.kill()
                return
            self.received.append(signum)
            _print(f"\nchimera: received {signal.Signals(signum).name}; stopping the running variants")
            for child in self._live:
                child.send_signal(signum)

    @contextlib.contextmanager
    def handling_signals(self):
        main = threading.current_thread() is threading.main_thread()  # handlers: main thread only
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            for s in previous:
                signal.signal(s, self._forward)
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _print(text: str) -> None:
    print(text, flush=True)


def _announce(ablation: Ablation, prepared: Sequence[Prepared], jobs: int, threads: str | None) -> None:
    from toolkit import tracking

    seeds = ", ".join(map(str, ablation.seeds))
    at_once = f"; {jobs} at a time" + (f", {threads} thread(s) each" if threads else "") if jobs > 1 else ""
    _print(
        f"chimera: ablation {ablation.name}: {len(ablation.variants)} variants x seeds [{seeds}] = "
        f"{len(prepared)} runs{at_once}; store {prepared[0].tracking_uri if prepared else '-'}"
    )
    by_uri: dict[str, str] = {}
    for p in prepared:
        by_uri.setdefault(p.tracking_uri, p.experiment)
    for uri, experiment in by_uri.items():  # the summary run says what the table reads back
        tracking.summary_run(
            uri,
            experiment,
            ablation.name,
            {
                "chimera.variants": ",".join(v.name for v in ablation.variants)[:5000],
                "chimera.baseline": ablation.baseline,
                "chimera.ablation_file": str(ablation.path),
            },
        )


def _log_path(item: Prepared) -> Path:
    return (
        item.run_dir.parent
        / "ablations"
        / item.job.ablation.name
        / f"{item.job.variant.name}-s{item.job.seed}.log"
    )


def _run_one(item: Prepared, head: str, children: _Children) -> tuple[int, str | None]:
    """(exit code, outcome): outcome is one of the sweep's counts (finished, skipped, elsewhere, failed)."""
    from toolkit.lock import RunLock

    claim = RunLock(item.run_dir.with_name(f"{item.run_dir.name}.ablate"))
    try:
        claim.acquire()  # held while this process runs the variant: another ablate process skips it
    except ChimeraError:
        _print(f"{head}: skipped: another chimera ablate process is running it ({_holder(claim)})")
        return 0, "elsewhere"
    try:
        try:
            RunLock(item.run_dir).acquire().release()
        except ChimeraError:
            _print(
                f"{head}: skipped: {item.run_dir} is in use by another run ({_holder(RunLock(item.run_dir))})"
            )
            return 0, "elsewhere"
        state = run_state(item.run_dir)
        if state == FINISHED:
            log_params(item)
            _print(f"{head}: finished earlier, skipped ({_shown_path(item.run_dir)})")
            return 0, "skipped"
        if children.received:  # the sweep is stopping: start nothing new
            return 128 + children.received[0], None
        log = _log_path(item)
        log.parent.mkdir(parents=True, exist_ok=True)
        what = "resuming from its checkpoint" if state == PARTIAL else "training"
        _print(f"{head}: {what} -> {_shown_path(item.run_dir)} (log {_shown_path(log)})")
        started = time.monotonic()
        code = _launch(item.job.command(resume=state == PARTIAL), log, children)
        if code is None:
            return 128 + children.received[0], None
        took = _duration(time.monotonic() - started)
        log_params(item)
        if code == 0 and run_state(item.run_dir) == FINISHED:
            _print(f"{head}: finished in {took}{_summary(item)}")
            return 0, "finished"
        if code >= 128:
            _print(f"{head}: stopped after {took} (exit {code}); its checkpoint is kept")
            return code, None
        _print(f"{head}: FAILED after {took} (exit {code}); last lines of {_shown_path(log)}:")
        for line in _tail(log, 15):
            _print(f"    {line}")
        return code or 1, "failed"
    finally:
        claim.release()


def _holder(lock: Any) -> str:
    try:
        info = json.loads(lock.path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    return f"pid {info['pid']} on {info.get('host')}" if info.get("pid") else f"lock {lock.path}"


def _summary(item: Prepared) -> str:
    """``: val/acc 0.512, val/loss 1.234`` from the run's last logged values (the final stage's)."""
    from toolkit import tracking

    ids = run_ids(item.run_dir)
    if not ids:
        return ""
    record = tracking.get_run_record(item.tracking_uri, ids[-1])
    if record is None:
        return ""
    shown = [f"{k} {v:.4g}" for k, v in sorted(record.metrics.items()) if k in ("val/acc", "val/loss")]
    return f": {', '.join(shown)}" if shown else ""


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM (a graceful stop after a checkpoint) if the ablate process dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _launch(command: list[str], log: Path, children: _Children) -> int | None:
    """Run one training process, its output appended to ``log``; its exit code (128 + N when a signal N
    stopped it), or None when the sweep was stopped before it started."""
    with open(log, "ab") as out:
        out.write(f"\n$ {shlex.join(command)}\n".encode())
        out.flush()
        child = children.start(command, out)
        if child is None:
            return None
        code = children.wait(child)
    if children.received:
        return 128 + children.received[0] if code == 0 or code < 128 else code
    return code if code >= 0 else 128 - code  # killed by signal N: Popen reports -N
