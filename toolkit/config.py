"""Experiment configs: YAML with ``base:`` inheritance, dotlist overrides, validation, embedded defaults.

One YAML file describes one experiment. Loading it:

1. reads every file named in ``base:`` (paths relative to the file that names them), in order, then the file;
2. applies command-line overrides ``key=value`` (OmegaConf dotlist syntax);
3. lays the result over ``DEFAULTS`` and checks every key: toolkit sections against ``DEFAULTS``, component
   nodes (``{name: ..., **kwargs}``) against the registered constructor's signature, ``trainer`` against
   Lightning's ``Trainer``; errors name the file (or "command line") that set the offending key.

Merging follows OmegaConf, with one rule added for component nodes: when a later source changes a node's
``name``, the node starts fresh from that source (its old constructor arguments belonged to the old
component). So ``model.connector.name=linear`` swaps an ``mlp`` connector in one override.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from toolkit.errors import ChimeraError, did_you_mean

COMMAND_LINE = "command line"

# The embedded defaults: synthetic data, CPU, a local MLflow store. Experiment files override what varies.
DEFAULTS: dict[str, Any] = {
    "name": None,  # run name; default: the experiment file's stem plus the overrides
    "seed": 0,
    "plugins": [],  # extra modules to import (they register components)
    "output_dir": "runs",  # checkpoints and resolved configs go to {output_dir}/{name}
    "model": {
        "encoder": None,
        "pooler": {"name": "identity"},
        "connector": {"name": "mlp", "depth": 2},
        "decoder": None,
        "pool_after_connector": False,
    },
    "data": {
        "train": {"name": "synthetic_shapes", "size": 2000, "tasks": ["color", "shape"]},
        "val": {"name": "synthetic_shapes", "size": 256, "split": "val", "tasks": ["color", "shape"]},
        "tokenizer": None,  # None: build a word-level tokenizer offline from the dataset's vocabulary
        "batch_size": 16,
        "val_batch_size": None,
        "num_workers": 0,
        "max_length": 512,
    },
    "optim": {
        "lr": 1e-3,
        "weight_decay": 0.0,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "warmup_steps": 0,
        "min_lr_ratio": 0.1,  # cosine decays to lr * min_lr_ratio at trainer.max_steps
        "trainable": None,  # glob patterns over module names; None: every parameter not frozen by its part
        "aux_loss_weight": 1.0,  # scale on the decoder's auxiliary (MoE) loss
    },
    "trainer": {
        "max_steps": 200,
        "val_check_interval": 100,
        "check_val_every_n_epoch": None,
        "limit_val_batches": None,
        "accumulate_grad_batches": 1,
        "gradient_clip_val": 1.0,
        "precision": "32-true",
        "accelerator": "auto",
        "devices": 1,
        "num_nodes": 1,
        "log_every_n_steps": 10,
        "enable_progress_bar": True,
        "num_sanity_val_steps": 0,
    },
    "strategy": {
        "name": "auto",  # auto | ddp | fsdp
        "activation_checkpointing": False,
        "checkpoint_format": "sharded",  # fsdp only: sharded (DCP) | full
        "reshard_after_forward": True,
        "find_unused_parameters": False,  # ddp only
    },
    "checkpoint": {"every_n_steps": 100, "save_last": True, "keep": 2},
    "perf": {
        "peak_tflops": None
    },  # per-device peak for MFU; None: datasheet value of a known GPU, else no MFU
    "tracking": {
        "uri": None,  # None: $MLFLOW_TRACKING_URI, else sqlite:///<abs output_dir>/mlflow.db
        "experiment": "chimera",
        "run_name": None,
        "tags": {},
    },
    "stages": [],
}

# Sections whose mapping values are free-form (checked elsewhere, or user data).
_FREE_FORM = {"tracking.tags"}
# Component nodes: the key -> registry kind they are checked against.
COMPONENT_NODES = {
    "model.encoder": "encoder",
    "model.pooler": "pooler",
    "model.connector": "connector",
    "model.decoder": "decoder",
    "data.train": "dataset",
    "data.val": "dataset",
}
STAGE_KEYS = {"name", "trainable", "data", "optim", "trainer", "model"}


def merge(base: Any, other: Any, path: str = "") -> Any:
    """Deep-merge plain containers; a component node whose ``name`` changes is replaced wholesale."""
    if isinstance(base, Mapping) and isinstance(other, Mapping):
        if path in COMPONENT_NODES and "name" in other and "name" in base and other["name"] != base["name"]:
            return copy.deepcopy(dict(other))
        out = dict(base)
        for key, value in other.items():
            dotted = f"{path}.{key}" if path else str(key)
            out[key] = merge(base[key], value, dotted) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(other)


def _flat_keys(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted
            yield from _flat_keys(value, dotted)


class Sources:
    """Which file (or the command line) set each dotted key last: errors name it."""

    def __init__(self, default: str) -> None:
        self.default = default
        self.by_key: dict[str, str] = {}

    def record(self, node: Mapping[str, Any], source: str) -> None:
        for key in _flat_keys(node):
            self.by_key[key] = source

    def of(self, key: str | None) -> str:
        while key:
            if key in self.by_key:
                return self.by_key[key]
            key = key.rpartition(".")[0]
        return self.default


def _read_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise ChimeraError(f"{path}: config file not found")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # YAML syntax errors carry the line number in their text
        raise ChimeraError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ChimeraError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def _load_with_bases(path: Path, sources: Sources, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise ChimeraError(f"{path}: base: cycle through {' -> '.join(str(p) for p in (*chain, path))}")
    raw = _read_yaml(path)
    bases = raw.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / str(base)).resolve()
        if not base_path.is_file():
            raise ChimeraError(f"{path}: base: file '{base}' not found (looked for {base_path})", key="base")
        merged = merge(merged, _load_with_bases(base_path, sources, (*chain, path)))
    sources.record(raw, str(path))
    return merge(merged, raw)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x,y]"]`` -> nested dict, with OmegaConf's value grammar."""
    from omegaconf import OmegaConf

    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ChimeraError(
                f"{COMMAND_LINE}: override '{item}' is not of the form key=value (e.g. optim.lr=3e-4)"
            )
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)
    except Exception as exc:
        raise ChimeraError(f"{COMMAND_LINE}: cannot parse overrides {list(overrides)}: {exc}") from exc


def load_config(path: str | Path, overrides: Sequence[str] = (), *, validate: bool = True):
    """Load, merge and validate an experiment. Returns an OmegaConf DictConfig with ``_meta`` stripped.

    ``cfg.name`` defaults to the file stem plus the overrides, so sweeps read well in the MLflow UI.
    """
    from omegaconf import OmegaConf

    path = Path(path)
    sources = Sources(str(path))
    user = _load_with_bases(path, sources)
    over = parse_overrides(overrides)
    sources.record(over, COMMAND_LINE)
    user = merge(user, over)
    if validate:
        check_keys(user, sources)
    cfg = merge(DEFAULTS, user)
    if not cfg.get("name"):
        cfg["name"] = run_name(path, overrides)
    try:
        conf = OmegaConf.create(cfg)
        OmegaConf.resolve(conf)
    except Exception as exc:
        raise ChimeraError(f"{path}: cannot resolve interpolations: {' '.join(str(exc).split())}") from exc
    if validate:
        check_components(conf, sources)
    return conf


def run_name(path: Path, overrides: Sequence[str]) -> str:
    name = path.stem
    for item in overrides:
        key, _, value = item.partition("=")
        name += f"_{key.rsplit('.', 1)[-1]}={value}"
    return name.replace("/", "-")[:200]


def check_keys(user: Mapping[str, Any], sources: Sources) -> None:
    """Every key the user wrote must exist in DEFAULTS (component nodes are checked later)."""

    def walk(node: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if dotted in COMPONENT_NODES or dotted in _FREE_FORM:
                continue
            if dotted == "stages":
                check_stages(value, sources)
                continue
            if dotted == "trainer":
                check_trainer(value, sources)
                continue
            if key not in schema:
                raise ChimeraError(
                    f"{sources.of(dotted)}: {dotted}: unknown key{did_you_mean(key, schema)}; "
                    f"known keys{' of ' + prefix if prefix else ''}: {', '.join(map(str, schema))}"
                )
            if isinstance(schema[key], Mapping) and value is not None:
                if not isinstance(value, Mapping):
                    raise ChimeraError(f"{sources.of(dotted)}: {dotted}: expected a mapping, got {value!r}")
                walk(value, schema[key], dotted)

    walk(user, {**DEFAULTS, "base": None}, "")


def check_trainer(node: Any, sources: Sources, prefix: str = "trainer") -> None:
    """Trainer keys are Lightning ``Trainer`` arguments (those Chimera does not set itself)."""
    if not isinstance(node, Mapping):
        raise ChimeraError(f"{sources.of(prefix)}: {prefix}: expected a mapping, got {node!r}")
    import inspect

    from lightning.pytorch import Trainer

    accepted = set(inspect.signature(Trainer.__init__).parameters) - {
        "self",
        "logger",
        "callbacks",
        "strategy",
        "plugins",
    }
    for key in node:
        if key not in accepted:
            raise ChimeraError(
                f"{sources.of(f'{prefix}.{key}')}: {prefix}.{key}: not an argument of lightning.Trainer"
                f"{did_you_mean(key, accepted)} (strategy, logger and callbacks come from Chimera's own sections)"
            )


def check_stages(stages: Any, sources: Sources) -> None:
    if not isinstance(stages, list):
        raise ChimeraError(
            f"{sources.of('stages')}: stages: expected a list of stage mappings, got {stages!r}"
        )
    seen = set()
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, Mapping) or not stage.get("name"):
            raise ChimeraError(f"{sources.of('stages')}: {where}: each stage needs a mapping with a 'name'")
        if stage["name"] in seen:
            raise ChimeraError(f"{sources.of('stages')}: {where}: duplicate stage name '{stage['name']}'")
        seen.add(stage["name"])
        for key in stage:
            if key not in STAGE_KEYS:
                raise ChimeraError(
                    f"{sources.of('stages')}: {where}.{key}: unknown stage key{did_you_mean(key, STAGE_KEYS)}; "
                    f"known: {', '.join(sorted(STAGE_KEYS))}"
                )
        if "trainer" in stage:
            check_trainer(stage["trainer"], sources, f"{where}.trainer")


def check_components(cfg: Any, sources: Sources) -> None:
    """Check every component node against its registered constructor, without building anything."""
    from omegaconf import OmegaConf

    from toolkit import registry

    registry.import_plugins(cfg.get("plugins") or [], where=f"{sources.of('plugins')}: plugins")
    for dotted, kind in COMPONENT_NODES.items():
        node = OmegaConf.select(cfg, dotted)
        if node is None:
            if dotted == "data.val":
                continue
            raise ChimeraError(
                f"{sources.default}: {dotted}: missing; set it to {{name: <a registered {kind}>, ...}}"
            )
        try:
            registry.validate(kind, node, dotted)
        except ChimeraError as exc:
            raise ChimeraError(f"{sources.of(exc.key or dotted)}: {exc}", key=exc.key) from exc


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True)


def stage_config(cfg: Any, stage: Mapping[str, Any]) -> Any:
    """The config one stage trains with: the experiment's sections with the stage's overrides laid on top."""
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(cfg, resolve=True)
    base["stages"] = []
    overrides = {k: v for k, v in stage.items() if k not in ("name", "trainable")}
    merged = merge(base, overrides)
    merged["optim"]["trainable"] = stage.get("trainable", merged["optim"].get("trainable"))
    return OmegaConf.create(merged)
