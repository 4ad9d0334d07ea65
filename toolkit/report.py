"""``chimera table`` / ``chimera plot``: an ablation's results, read back from MLflow (never from memory).

The runs of ablation NAME are the MLflow runs tagged ``chimera.ablation=NAME`` (``toolkit.ablation`` tags
them, with ``chimera.variant`` and ``chimera.seed``). Per variant and seed, the latest FINISHED run counts
(for a staged recipe: its parent run, with the metrics of its last stage); a variant is one row::

    variant | seeds | val/acc (final) | Δ | val/acc (best) | Δ | ... | params | trainable | image tokens | tokens/s | wall

- a metric column is ``KEY:final`` (the last logged value, what ``mlflow.search_runs`` returns) or
  ``KEY:best`` (the best value of the run's history: the max, or the min for a loss or an error; ``KEY:max``
  and ``KEY:min`` choose explicitly), as mean ± sample standard deviation over the seeds;
- Δ: the difference of the means to the baseline row (the ablation file's ``baseline:``, else its first
  variant);
- the cost: ``total_params`` / ``trainable_params`` and ``image_tokens`` (run params), ``perf/tokens_per_s``
  (the mean of its logged history) and the wall time (the run's start to its end: a resumed run's pause is
  included).

Both the table and the plot are also stored as artifacts of the ablation's summary run (tags
``chimera.ablation=NAME``, ``chimera.summary=true``), so the UI shows what the command printed.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ChimeraError

FORMATS = ("md", "csv", "latex")
_LOWER_IS_BETTER = re.compile(r"loss|perplexity|ppl|error|err\b|wer|cer", re.I)
TOKENS_PER_S = "perf/tokens_per_s"


@dataclass(frozen=True)
class MetricSpec:
    """A metric column: ``key`` aggregated as ``final`` (last value) or ``best`` (``mode`` max or min)."""

    key: str
    agg: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.key} ({self.agg})" if self.agg == "final" else f"{self.key} (best, {self.mode})"

    @property
    def column(self) -> str:  # csv column stem
        return f"{self.key}:{self.agg}" if self.agg == "final" else f"{self.key}:{self.mode}"


def parse_metric(text: str) -> MetricSpec:
    """``val/acc`` / ``val/acc:final`` (last value), ``val/acc:best`` (max; min for losses and errors),
    ``val/loss:min`` / ``val/acc:max``."""
    key, sep, agg = str(text).rpartition(":")
    if not sep:
        key, agg = str(text), "final"
    key, agg = key.strip(), agg.strip().lower()
    if not key or agg not in ("final", "best", "max", "min"):
        raise ChimeraError(
            f"--metrics {text}: expected KEY, KEY:final, KEY:best, KEY:max or KEY:min (e.g. val/acc:best)"
        )
    if agg == "final":
        return MetricSpec(key, "final", "max")
    mode = agg if agg in ("max", "min") else ("min" if _LOWER_IS_BETTER.search(key) else "max")
    return MetricSpec(key, "best", mode)


# ---------------------------------------------------------------------------------------------- source


@dataclass
class Source:
    """Where an ablation's runs are and how to show them."""

    name: str
    tracking_uri: str
    order: list[str] | None = None  # variant order (the file's, or the summary run's)
    baseline: str | None = None
    metrics: list[str] = field(default_factory=list)
    experiment: str | None = None
    out_dir: Path | None = None  # default folder of the plot


def resolve(file_or_name: str | Path, tracking_uri: str | None = None) -> Source:
    """An ablation file (its name, variants, baseline, metrics and store from the file and its base), or an
    ablation name (the store: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``runs/mlflow.db``)."""
    from toolkit import tracking
    from toolkit.ablation import DEFAULT_METRICS, load_ablation, make_jobs

    path = Path(file_or_name)
    if path.is_file():
        ablation = load_ablation(path)
        from toolkit.plan import load_plan

        first = make_jobs(ablation)[0]
        plan = load_plan(first.variant.base, first.overrides, check_model=False)
        return Source(
            name=ablation.name,
            tracking_uri=tracking_uri or plan.tracking_uri,
            order=[v.name for v in ablation.variants],
            baseline=ablation.baseline,
            metrics=list(ablation.metrics),
            experiment=plan.experiment,
            out_dir=Path(plan.cfg.output_dir) / "ablations" / ablation.name,
        )
    text = str(file_or_name)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        raise ChimeraError(f"{text}: ablation file not found (or pass an ablation name)")
    uri = (
        tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path('runs').resolve() / 'mlflow.db'}"
    )
    source = Source(name=text, tracking_uri=uri, metrics=list(DEFAULT_METRICS))
    db = tracking.sqlite_path(uri)
    source.out_dir = Path(db).parent / "ablations" / text if db else Path.cwd()
    for summary in tracking.find_runs(uri, {tracking.ABLATION_TAG: text, tracking.SUMMARY_TAG: "true"})[:1]:
        if summary.tags.get("chimera.variants"):
            source.order = summary.tags["chimera.variants"].split(",")
        source.baseline = summary.tags.get("chimera.baseline") or None
    return source


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class SeedRun:
    """One finished run of a variant: ``primary`` (the run, or a staged recipe's parent), ``stages`` (the
    runs that trained: ``[primary]`` or the stage runs in order); metrics come from ``stages[-1]``."""

    variant: str
    seed: str
    primary: Any  # tracking.RunRecord
    stages: list[Any]

    @property
    def metric_run(self) -> Any:
        return self.stages[-1]


def collect(uri: str, name: str) -> tuple[dict[str, list[SeedRun]], list[Any]]:
    """Per variant, its finished runs (one per seed: the latest, when a seed was run more than once); and
    the ablation's unfinished runs (running, failed or killed), for the note under the table."""
    from toolkit import tracking

    runs = [
        r
        for r in tracking.find_runs(uri, {tracking.ABLATION_TAG: name})
        if r.tags.get(tracking.SUMMARY_TAG) != "true"
    ]
    children: dict[str, list[Any]] = {}
    for r in runs:
        if r.parent_id:
            children.setdefault(r.parent_id, []).append(r)
    chosen: dict[tuple[str, str], Any] = {}
    unfinished = []
    for r in runs:
        if r.parent_id or tracking.VARIANT_TAG not in r.tags:
            continue
        key = (r.tags[tracking.VARIANT_TAG], r.tags.get(tracking.SEED_TAG, "?"))
        if r.status != "FINISHED":
            unfinished.append(r)
            continue
        if key not in chosen or (r.start_time or 0) >= (chosen[key].start_time or 0):
            chosen[key] = r
    out: dict[str, list[SeedRun]] = {}
    for (variant, seed), r in chosen.items():
        stages = sorted(children.get(r.run_id, []), key=lambda c: int(c.tags.get("chimera.stage_index", 0)))
        out.setdefault(variant, []).append(SeedRun(variant, seed, r, stages or [r]))
    for seed_runs in out.values():
        seed_runs.sort(key=lambda s: (not s.seed.isdigit(), int(s.seed) if s.seed.isdigit() else 0, s.seed))
    unfinished = [
        r
        for r in unfinished
        if (r.tags[tracking.VARIANT_TAG], r.tags.get(tracking.SEED_TAG, "?")) not in chosen
    ]
    return out, unfinished


def metric_value(uri: str, run: SeedRun, spec: MetricSpec) -> float | None:
    """The run's value for a metric column: the last logged value, or the best of its history."""
    from toolkit import tracking

    if spec.agg == "final":
        return run.metric_run.metrics.get(spec.key)
    return tracking.best_metric(uri, run.metric_run.run_id, spec.key, spec.mode)


def tokens_per_s(uri: str, run: SeedRun) -> float | None:
    """The mean of every logged ``perf/tokens_per_s`` value over the run's stages."""
    from toolkit import tracking

    values = [v for s in run.stages for _, v, _ in tracking.metric_history(uri, s.run_id, TOKENS_PER_S)]
    return statistics.fmean(values) if values else None


# ---------------------------------------------------------------------------------------------- table


@dataclass
class Cell:
    """A metric over seeds: mean, sample std (None for one seed), difference to the baseline's mean."""

    values: list[float]
    mean: float | None
    std: float | None
    delta: float | None = None


@dataclass
class Row:
    variant: str
    seeds: list[str]
    cells: dict[MetricSpec, Cell]
    total_params: int | None
    trainable_params: int | None
    image_tokens: int | None
    tokens_per_s: float | None
    wall_s: float | None


@dataclass
class Table:
    name: str
    tracking_uri: str
    specs: list[MetricSpec]
    rows: list[Row]
    baseline: str | None
    unfinished: list[str]  # "variant seed N (STATUS)"


def _cell(values: list[float]) -> Cell:
    if not values:
        return Cell([], None, None)
    return Cell(values, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)


def _param(run: SeedRun, key: str) -> int | None:
    for r in (run.metric_run, run.primary):
        value = r.params.get(key)
        if value is not None:
            try:
                return int(float(value))
            except ValueError:
                return None
    return None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def compute_table(
    uri: str,
    name: str,
    metrics: Sequence[str],
    *,
    order: Sequence[str] | None = None,
    baseline: str | None = None,
) -> Table:
    """The table's numbers, from the store at ``uri``. Rows follow ``order`` (then any other variant found,
    by first run); ``baseline`` defaults to the first row."""
    specs = [parse_metric(m) for m in metrics]
    if not specs:
        raise ChimeraError("--metrics: name at least one metric (e.g. val/acc:final)")
    found, unfinished = collect(uri, name)
    if not found and not unfinished:
        raise ChimeraError(
            f"no runs of ablation '{name}' in {uri} (runs are found by their tag chimera.ablation={name}); "
            "run it first (chimera ablate FILE), or point --tracking-uri / $MLFLOW_TRACKING_URI at its store"
        )
    names = list(order or [])
    for variant in [*found, *(r.tags["chimera.variant"] for r in unfinished)]:
        if variant not in names:
            names.append(variant)
    rows = []
    for variant in names:
        runs = found.get(variant, [])
        cells = {}
        for spec in specs:
            cells[spec] = _cell([v for v in (metric_value(uri, r, spec) for r in runs) if v is not None])
        first = runs[0] if runs else None
        rows.append(
            Row(
                variant=variant,
                seeds=[r.seed for r in runs],
                cells=cells,
                total_params=_param(first, "total_params") if first else None,
                trainable_params=_param(first, "trainable_params") if first else None,
                image_tokens=_param(first, "image_tokens") if first else None,
                tokens_per_s=_mean([tokens_per_s(uri, r) for r in runs]),
                wall_s=_mean([r.primary.wall_s for r in runs]),
            )
        )
    baseline = baseline or (names[0] if names else None)
    base_row = next((r for r in rows if r.variant == baseline), None)
    for row in rows:
        for spec, cell in row.cells.items():
            base = base_row.cells[spec].mean if base_row else None
            if row is not base_row and cell.mean is not None and base is not None:
                cell.delta = cell.mean - base
    notes = [
        f"{r.tags['chimera.variant']} seed {r.tags.get('chimera.seed', '?')} ({r.status.lower()})"
        for r in unfinished
    ]
    return Table(name, uri, specs, rows, baseline, notes)


def _num(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    return (
        f"{n / 1e9:.2f}B"
        if n >= 1e9
        else f"{n / 1e6:.2f}M"
        if n >= 1e6
        else f"{n / 1e3:.1f}K"
        if n >= 1e3
        else str(n)
    )


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _header(table: Table) -> str:
    seeds = sorted({s for r in table.rows for s in r.seeds}, key=lambda s: (len(s), s))
    aggs = []
    if any(s.agg == "final" for s in table.specs):
        aggs.append("(final) = the last logged value")
    if any(s.agg == "best" for s in table.specs):
        aggs.append("(best, max|min) = the best value of the run's history")
    text = (
        f"Ablation {table.name}: mean ± sample std over seeds [{', '.join(seeds)}] (no std for one seed); "
        f"{'; '.join(aggs)}; Δ = difference of the means to the baseline {table.baseline}. Staged variants: "
        "their last stage's metrics; tokens/s: mean of perf/tokens_per_s; wall: run start to end."
    )
    if table.unfinished:
        text += f" Not finished (left out): {', '.join(table.unfinished)}."
    return text


def _columns(table: Table) -> list[str]:
    cols = ["variant", "seeds"]
    for spec in table.specs:
        cols += [spec.label, "Δ"]
    return cols + ["params", "trainable", "image tokens", "tokens/s", "wall"]


def _text_rows(table: Table, pm: str) -> list[list[str]]:
    out = []
    for row in table.rows:
        cells = [row.variant, str(len(row.seeds))]
        for spec in table.specs:
            c = row.cells[spec]
            value = _num(c.mean) + (f" {pm} {_num(c.std)}" if c.std is not None else "")
            if row.variant == table.baseline:
                delta = "baseline"
            else:
                delta = "–" if c.delta is None else f"{c.delta:+.3f}"
            cells += [value, delta]
        cells += [
            _count(row.total_params),
            _count(row.trainable_params),
            "–" if row.image_tokens is None else str(row.image_tokens),
            "–" if row.tokens_per_s is None else f"{row.tokens_per_s:,.0f}",
            _wall(row.wall_s),
        ]
        out.append(cells)
    return out


def format_md(table: Table) -> str:
    cols = _columns(table)
    lines = [
        _header(table),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(["---"] + ["--:"] * (len(cols) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in _text_rows(table, "±")]
    return "\n".join(lines)


def format_csv(table: Table) -> str:
    """One line per variant, raw numbers (empty when missing): for each metric ``KEY:AGG_mean``, ``_std``,
    ``_delta``, then ``n_seeds``, ``seeds``, ``total_params``, ``trainable_params``, ``image_tokens``,
    ``tokens_per_s``, ``wall_s``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    head = ["variant"]
    for spec in table.specs:
        head += [f"{spec.column}_mean", f"{spec.column}_std", f"{spec.column}_delta"]
    writer.writerow(
        head
        + ["n_seeds", "seeds", "total_params", "trainable_params", "image_tokens", "tokens_per_s", "wall_s"]
    )

    def raw(v: Any) -> str:
        return "" if v is None else repr(v) if isinstance(v, float) else str(v)

    for row in table.rows:
        line = [row.variant]
        for spec in table.specs:
            c = row.cells[spec]
            line += [raw(c.mean), raw(c.std), raw(c.delta)]
        line += [
            str(len(row.seeds)),
            " ".join(row.seeds),
            raw(row.total_params),
            raw(row.trainable_params),
            raw(row.image_tokens),
            raw(row.tokens_per_s),
            raw(row.wall_s),
        ]
        writer.writerow(line)
    return buf.getvalue()


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\^{}",
}


def _tex(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text).replace("Δ", r"$\Delta$").replace("–", "--")


def format_latex(table: Table) -> str:
    cols = _columns(table)
    rows = _text_rows(table, "PLUSMINUS")
    lines = [
        "% " + _header(table).replace("±", "+-").replace("Δ", "delta"),
        r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}",
        r"\toprule",
        " & ".join(_tex(c) for c in cols) + r" \\",
        r"\midrule",
    ]
    for r in rows:
        lines.append(" & ".join(_tex(c).replace("PLUSMINUS", r"$\pm$") for c in r) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


FORMATTERS = {"md": format_md, "csv": format_csv, "latex": format_latex}
_SUFFIX = {"md": "md", "csv": "csv", "latex": "tex"}


def table(
    file_or_name: str | Path,
    *,
    fmt: str = "md",
    metrics: Sequence[str] | None = None,
    tracking_uri: str | None = None,
    store: bool = True,
) -> str:
    """``chimera table FILE_OR_NAME [--format md|csv|latex] [--metrics KEY[:AGG] ...]``: the table as text
    (to print). ``store``: also log it as ``table.{md,csv,tex}`` on the ablation's summary run."""
    if fmt not in FORMATTERS:
        raise ChimeraError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    source = resolve(file_or_name, tracking_uri)
    result = compute_table(
        source.tracking_uri,
        source.name,
        list(metrics or source.metrics),
        order=source.order,
        baseline=source.baseline,
    )
    text = FORMATTERS[fmt](result).rstrip("\n")
    if store:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"table.{_SUFFIX[fmt]}"
            path.write_text(text + "\n")
            _store(source, path)
    return text


def _store(source: Source, path: Path) -> None:
    from toolkit import tracking

    experiment = source.experiment or _experiment_of(source)
    run_id = tracking.summary_run(source.tracking_uri, experiment, source.name)
    tracking.log_artifact_file(source.tracking_uri, run_id, path)


def _experiment_of(source: Source) -> str:
    """The experiment of the ablation's first run (the summary run joins it)."""
    from toolkit import tracking

    runs = tracking.find_runs(source.tracking_uri, {tracking.ABLATION_TAG: source.name})
    return tracking.experiment_name(source.tracking_uri, runs[0].experiment_id) if runs else "chimera"


# ---------------------------------------------------------------------------------------------- plot


def curves(uri: str, run: SeedRun, key: str) -> list[list[tuple[int, float]]]:
    """A run's history of ``key`` as segments, one per stage, on one step axis: stage k's steps follow the
    previous stages' (their ``trainer.max_steps`` param, else their last logged step)."""
    from toolkit import tracking

    segments, offset = [], 0
    for stage in run.stages:
        history = tracking.metric_history(uri, stage.run_id, key)
        if history:
            segments.append([(offset + step, value) for step, value, _ in history])
        steps = stage.params.get("trainer.max_steps")
        offset += int(steps) if steps and steps.isdigit() else (history[-1][0] + 1 if history else 0)
    return segments


def plot(
    file_or_name: str | Path,
    *,
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    tracking_uri: str | None = None,
    store: bool = True,
) -> Path:
    """``chimera plot FILE_OR_NAME [--out PNG] [--metrics KEY ...]``: validation curves, one line per variant
    (the mean over seeds at the steps all seeds logged; a band from the lowest to the highest seed), one
    panel per metric key. Returns the PNG's path (default ``{output_dir}/ablations/NAME/curves.png``);
    ``store``: also log it as ``curves.png`` on the ablation's summary run."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ChimeraError(
            "chimera plot needs matplotlib: pip install 'chimera-toolkit[plot]' (or pip install matplotlib)"
        ) from exc

    source = resolve(file_or_name, tracking_uri)
    keys: list[str] = []
    for m in metrics or source.metrics:
        key = parse_metric(m).key
        if key not in keys:
            keys.append(key)
    found, _ = collect(source.tracking_uri, source.name)
    if not found:
        raise ChimeraError(f"no finished runs of ablation '{source.name}' in {source.tracking_uri}")
    names = [n for n in (source.order or []) if n in found] + [
        n for n in found if n not in (source.order or [])
    ]

    fig = Figure(figsize=(5.5 * len(keys), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(names))]
    for ax, key in zip(axes, keys):
        for variant, color in zip(names, colors):
            per_seed = [curves(source.tracking_uri, r, key) for r in found[variant]]
            n_segments = min((len(s) for s in per_seed), default=0)
            label = f"{variant} (n={len(per_seed)})"
            for k in range(n_segments):
                steps = sorted(set.intersection(*(set(dict(s[k])) for s in per_seed)))
                if not steps:
                    continue
                by_seed = [dict(s[k]) for s in per_seed]
                mean = [statistics.fmean(d[x] for d in by_seed) for x in steps]
                ax.plot(steps, mean, color=color, marker="o", markersize=3, label=label if k == 0 else None)
                if len(by_seed) > 1:
                    lo = [min(d[x] for d in by_seed) for x in steps]
                    hi = [max(d[x] for d in by_seed) for x in steps]
                    ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_title(f"{source.name}: {key}")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    path = Path(out) if out else (source.out_dir or Path.cwd()) / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    if store:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "curves.png"
            copy.write_bytes(path.read_bytes())
            _store(source, copy)
    return path
