"""The run plan: an experiment file resolved ONCE into everything a command needs.

``load_plan(CONFIG, overrides)`` reads the YAML (``toolkit.config``), then resolves and validates each stage's
config exactly like the top level, checks every component node against its constructor, builds the model on
the meta device (so a constructor's own checks run, with the file and key named, before anything is written),
and fixes the run's identity: its folder ``{output_dir}/{name}``, the tracking URI and the tags. A plain
experiment is a one-stage plan without a parent run, so ``train``, ``describe``, ``bench`` and ablations
follow one code path::

    Plan
     ├── cfg            the resolved experiment (OmegaConf), output_dir absolute
     ├── stages[i]      StagePlan(name, index, cfg, run_dir): one per stage, or the experiment itself
     ├── staged         True when the experiment has ``stages:`` (one MLflow parent run, a child per stage)
     ├── run_dir        {output_dir}/{name}: config.yaml, run.json, checkpoints/ (per stage: stageN_NAME/)
     ├── tracking_uri   tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///{output_dir}/mlflow.db
     ├── tags           experiment file, overrides, git commit, run folder, tracking.tags
     └── tokenizer      built on first use, over every stage's datasets (one vocabulary for all stages)

``run.json`` (``RunState``) is the bookkeeping ``--resume`` reads; rank 0 rewrites it atomically::

    {"tracking_uri": ..., "run_id": ..., "finished": false}                      # a one-stage plan
    {"tracking_uri": ..., "parent_run_id": ..., "finished": false,               # a staged recipe
     "stages": {"align": {"run_id": ..., "finished": true, "weights": ".../final.safetensors"}, ...}}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from toolkit.errors import ChimeraError

RUN_STATE = "run.json"
RESOLVED_CONFIG = "config.yaml"


@dataclass
class StagePlan:
    """One stage of a plan (for an experiment without stages: the experiment itself)."""

    name: str
    index: int  # 0-based position in the recipe
    cfg: Any  # the resolved, validated config this stage trains with
    run_dir: Path  # checkpoints/ and the final weights go here
    label: str  # how errors and logs name it: "stages[1] (instruct)" or the run name


@dataclass
class Plan:
    config_path: Path
    overrides: list[str]
    cfg: Any
    stages: list[StagePlan]
    staged: bool
    run_dir: Path
    tracking_uri: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.cfg.name)

    @property
    def experiment(self) -> str:
        return str(self.cfg.tracking.experiment)

    @cached_property
    def tokenizer(self) -> Any:
        from toolkit.assemble import build_tokenizer

        return build_tokenizer(self.cfg)

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        if not self.staged:
            raise ChimeraError(f"{self.config_path}: --stage {name}: this experiment has no stages")
        names = ", ".join(s.name for s in self.stages)
        raise ChimeraError(f"{self.config_path}: --stage {name}: no such stage; stages: {names}")

    def command(self, *extra: str) -> str:
        """The ``chimera train`` command line that reproduces this plan (for messages)."""
        import shlex

        return "chimera train " + shlex.join([str(self.config_path), *self.overrides, *extra])


def load_plan(config_path: str | Path, overrides: Sequence[str] = (), *, check_model: bool = True) -> Plan:
    """Resolve and validate an experiment into a plan; nothing is written and no MLflow run is created.

    ``check_model`` builds each stage's model on the meta device (no memory), so a component's own argument
    checks fail here with the file and key named.
    """
    from toolkit import tracking
    from toolkit.config import Sources, check_components, load_config, stage_config, stage_label

    config_path = Path(config_path)
    overrides = list(overrides)
    cfg, sources = load_config(config_path, overrides, with_sources=True)
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    run_dir = Path(cfg.output_dir) / str(cfg.name)
    stage_nodes = list(cfg.get("stages") or [])
    stages: list[StagePlan] = []
    for i, node in enumerate(stage_nodes):
        label = stage_label(i, node)
        scfg = stage_config(cfg, node)
        try:
            check_components(scfg, Sources(sources.of("stages")))
        except ChimeraError as exc:
            raise ChimeraError(f"{label}: {exc}", key=exc.key) from exc
        name = str(node["name"])
        stages.append(StagePlan(name, i, scfg, run_dir / f"stage{i + 1}_{name}", label))
    if not stages:
        stages = [StagePlan(str(cfg.name), 0, cfg, run_dir, str(cfg.name))]
    plan = Plan(
        config_path=config_path,
        overrides=overrides,
        cfg=cfg,
        stages=stages,
        staged=bool(stage_nodes),
        run_dir=run_dir,
        tracking_uri=tracking.tracking_uri(cfg),
        tags={
            **tracking.run_tags(cfg, config_path, overrides),
            "chimera.run_dir": str(run_dir),
        },
    )
    if check_model:
        check_models(plan, sources)
    return plan


def check_models(plan: Plan, sources: Any) -> None:
    """Build each distinct model config on the meta device; constructor errors name the file and key."""
    import torch
    from omegaconf import OmegaConf

    from toolkit.assemble import build_model

    seen: list[Any] = []
    for stage in plan.stages:
        node = OmegaConf.to_container(stage.cfg.model, resolve=True)
        if node in seen:
            continue
        seen.append(node)
        try:
            with torch.device("meta"):
                build_model(stage.cfg, plan.tokenizer)
        except ChimeraError as exc:
            where = sources.of(exc.key) if exc.key else str(plan.config_path)
            prefix = f"{stage.label}: " if plan.staged else ""
            raise ChimeraError(f"{where}: {prefix}{exc}", key=exc.key) from exc


def resume_target(target: str, output_dir: str | Path = "runs") -> Path:
    """The resolved config of the run ``--resume TARGET`` names: a run folder, or an MLflow run id.

    A run id is looked up in ``$MLFLOW_TRACKING_URI`` or the default store ``{output_dir}/mlflow.db``, through
    the run's ``chimera.run_dir`` tag.
    """
    folder = Path(target)
    if folder.is_dir():
        config = folder / RESOLVED_CONFIG
        if not config.is_file():
            raise ChimeraError(
                f"--resume {target}: {folder} holds no {RESOLVED_CONFIG}; is it a Chimera run folder "
                f"({{output_dir}}/{{name}})?"
            )
        return config
    import os

    from toolkit import tracking

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"
    run_dir = tracking.run_dir_of(uri, target)
    if run_dir is None:
        raise ChimeraError(
            f"--resume {target}: not a run folder, and no MLflow run with that id in {uri} "
            "(pass the run folder, e.g. runs/NAME, or set MLFLOW_TRACKING_URI to the store that holds the run)"
        )
    return resume_target(run_dir, output_dir)


class RunState:
    """``run.json``: read by every rank, written (atomically) by rank 0 only.

    ``record(stage)`` is where a stage's MLflow run id, ``finished`` flag and final weights live: the top
    level for a one-stage plan, ``stages[name]`` for a staged recipe.
    """

    def __init__(self, plan: Plan, writer: bool) -> None:
        self.path, self.writer, self.staged = plan.run_dir / RUN_STATE, writer, plan.staged
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
                if not isinstance(self.data, dict):
                    raise ValueError(f"expected a JSON object, got {type(self.data).__name__}")
            except ValueError as exc:
                raise ChimeraError(
                    f"{self.path}: damaged run state ({exc}); move the run folder aside and start afresh, "
                    f"or restore {RUN_STATE} from a backup"
                ) from exc
        self.data["tracking_uri"] = plan.tracking_uri

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def reset(self) -> None:
        self.data = {"tracking_uri": self.data["tracking_uri"]}

    def save(self) -> None:
        if self.writer:
            from toolkit.strategies import atomic_write_bytes

            atomic_write_bytes(str(self.path), json.dumps(self.data, indent=2).encode())

    def record(self, stage: StagePlan) -> dict[str, Any]:
        if not self.staged:
            return self.data
        return self.data.setdefault("stages", {}).setdefault(stage.name, {})
