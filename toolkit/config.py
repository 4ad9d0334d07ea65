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
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
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
        "vision": {  # the token plan's settings (toolkit/token_plan.py, docs/vision.md)
            "anyres": False,  # LLaVA-NeXT AnyRes: tiles + a global view per image (frames are never tiled)
            "grids": "anyres",  # anyres | anyres_max_N | [[rows, cols], ...]
            "newline": True,  # a learned embedding ends each row of AnyRes features
            "unpad": True,  # llava_next: drop the features that only show padding
            "layout": "llava_next",  # llava_next | longllava
            "frame_stride": None,  # video frames' tokens 2D-pooled after the connector (LLaVA-NeXT-Video: 2)
        },
        "init": None,  # whole-model pretrained weights {path, layout} (parts take their own `init:`)
    },
    "data": {
        "train": {"name": "synthetic_shapes", "size": 2000, "tasks": ["color", "shape"]},
        "val": {"name": "synthetic_shapes", "size": 256, "split": "val", "tasks": ["color", "shape"]},
        "template": {"name": "vicuna_v1"},  # prompt template (components/templates)
        "tokenizer": None,  # None: build a word-level tokenizer offline from the dataset's vocabulary
        "batch_size": 16,
        "val_batch_size": None,
        "num_workers": 0,
        "max_length": 512,
        "preprocess": "resize",  # resize | center_crop | pad (LLaVA-1.5's letterbox), from the encoder's timm config
        "max_image_tokens": None,  # cap on the image tokens of one sample; None: no cap
        "over_budget": "error",  # error | fewer_frames | fewer_tiles
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
        "activation_checkpointing": False,  # true | false | [layer kinds: attention, mamba, encoder, ...]
        "checkpoint_format": "sharded",  # fsdp only: sharded (DCP) | full
        "reshard_after_forward": True,  # true | false | auto
        "find_unused_parameters": False,  # ddp only
        "init": "eager",  # eager | meta (build on meta, shard, each rank initialises only its shard)
        "frozen_dtype": None,  # keep frozen parts in this dtype: null | bf16 | fp16 | fp32
        "shard_frozen": True,  # fsdp: shard frozen parts too (false: a whole copy on every rank)
        "part_precision": {},  # fsdp: {part: 32-true | bf16-mixed | 16-mixed} per-part mixed precision
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
_FREE_FORM = {"tracking.tags", "model.init"}
# Component nodes: the key -> registry kind they are checked against.
COMPONENT_NODES = {
    "model.encoder": "encoder",
    "model.pooler": "pooler",
    "model.connector": "connector",
    "model.decoder": "decoder",
    "data.train": "dataset",
    "data.val": "dataset",
    "data.template": "template",
}
STAGE_KEYS = {"name", "trainable", "data", "optim", "trainer", "model"}
STAGE_SECTIONS = ("data", "optim", "trainer", "model")


class Rule:
    """The type and range a toolkit key's value must have; ``text`` is what the error and the docs say."""

    def __init__(self, text: str, ok: Callable[[Any], bool]) -> None:
        self.text, self.ok = text, ok


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(lo: int) -> Rule:
    return Rule(f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo)


def _num(text: str, ok: Callable[[float], bool]) -> Rule:
    return Rule(text, lambda v: _is_num(v) and ok(v))


def _optional(rule: Rule) -> Rule:
    return Rule(f"{rule.text}, or null", lambda v: v is None or rule.ok(v))


def _choice(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices)


_BOOL = Rule("true or false", lambda v: isinstance(v, bool))
_STR = Rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
_GLOBS = Rule(
    "a glob or a list of globs over parameter names, or null",
    lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
)
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")

# Type and range of every toolkit key (``trainer`` keys Chimera does not list are Lightning's to check).
# docs/configs.md lists the same table; a test keeps the two in step.
RULES: dict[str, Rule] = {
    "name": _optional(
        Rule(
            "a run name of letters, digits and . _ - = , + (not starting with '.'); it names a folder in output_dir",
            lambda v: (
                isinstance(v, str)
                and re.fullmatch(r"[A-Za-z0-9_=,+-][A-Za-z0-9._=,+-]{0,199}", v) is not None
            ),
        )
    ),
    "seed": _int(0),
    "output_dir": _STR,
    "plugins": Rule(
        "a list of module names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
    ),
    "model.pool_after_connector": _BOOL,
    "model.vision.anyres": _BOOL,
    "model.vision.grids": Rule(
        "anyres, anyres_max_N (N >= 1) or a list of [rows, cols] grids",
        lambda v: (
            (isinstance(v, str) and re.fullmatch(r"anyres|anyres_max_[1-9][0-9]*", v) is not None)
            or (
                isinstance(v, list)
                and len(v) > 0
                and all(
                    isinstance(g, list) and len(g) == 2 and all(_is_int(x) and x >= 1 for x in g) for g in v
                )
            )
        ),
    ),
    "model.vision.newline": _BOOL,
    "model.vision.unpad": _BOOL,
    "model.vision.layout": _choice("llava_next", "longllava"),
    "model.vision.frame_stride": _optional(_int(1)),
    "data.tokenizer": _optional(_STR),
    "data.batch_size": _int(1),
    "data.val_batch_size": _optional(_int(1)),
    "data.num_workers": _int(0),
    "data.max_length": _int(1),
    "data.preprocess": _choice("resize", "center_crop", "pad"),
    "data.max_image_tokens": _optional(_int(1)),
    "data.over_budget": _choice("error", "fewer_frames", "fewer_tiles"),
    "optim.lr": _num("a number > 0", lambda v: v > 0),
    "optim.weight_decay": _num("a number >= 0", lambda v: v >= 0),
    "optim.betas": Rule(
        "two numbers in [0, 1), e.g. [0.9, 0.95]",
        lambda v: isinstance(v, list) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v),
    ),
    "optim.eps": _num("a number > 0", lambda v: v > 0),
    "optim.warmup_steps": _int(0),
    "optim.min_lr_ratio": _num("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "optim.trainable": _GLOBS,
    "optim.aux_loss_weight": _num("a number >= 0", lambda v: v >= 0),
    "trainer.max_steps": _int(1),
    "trainer.val_check_interval": Rule(
        "an integer >= 1 (steps), a fraction in (0, 1] of an epoch, or null",
        lambda v: v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
    ),
    "trainer.check_val_every_n_epoch": _optional(_int(1)),
    "trainer.limit_val_batches": Rule(
        "an integer >= 0 (batches), a fraction in [0, 1], or null",
        lambda v: v is None or (_is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1),
    ),
    "trainer.accumulate_grad_batches": _int(1),
    "trainer.gradient_clip_val": _optional(_num("a number >= 0", lambda v: v >= 0)),
    "trainer.precision": _choice(*PRECISIONS),
    "trainer.accelerator": _choice(*ACCELERATORS),
    "trainer.devices": Rule(
        "an integer >= 1, 'auto', or a list of device indices",
        lambda v: (
            (_is_int(v) and v >= 1) or v == "auto" or (isinstance(v, list) and v and all(map(_is_int, v)))
        ),
    ),
    "trainer.num_nodes": _int(1),
    "trainer.log_every_n_steps": _int(1),
    "trainer.enable_progress_bar": _BOOL,
    "trainer.num_sanity_val_steps": _int(-1),
    "strategy.name": _choice("auto", "ddp", "fsdp"),
    "strategy.activation_checkpointing": Rule(
        "true, false or a list of layer kinds (encoder, decoder, attention, mamba, mamba2, mlp, moe, or a "
        "plugin mixer/ffn name)",
        lambda v: isinstance(v, bool) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
    ),
    "strategy.checkpoint_format": _choice("sharded", "full"),
    "strategy.reshard_after_forward": Rule(
        "true, false or auto", lambda v: isinstance(v, bool) or v == "auto"
    ),
    "strategy.init": _choice("eager", "meta"),
    "strategy.frozen_dtype": _optional(_choice("bf16", "fp16", "fp32")),
    "strategy.shard_frozen": _BOOL,
    "strategy.part_precision": Rule(
        "a mapping of parts (encoder, pooler, connector, decoder) to 32-true, bf16-mixed or 16-mixed",
        lambda v: (
            isinstance(v, Mapping)
            and all(
                k in ("encoder", "pooler", "connector", "decoder")
                and x in ("32-true", "bf16-mixed", "16-mixed")
                for k, x in v.items()
            )
        ),
    ),
    "strategy.find_unused_parameters": _BOOL,
    "checkpoint.every_n_steps": _int(1),
    "checkpoint.save_last": _BOOL,
    "checkpoint.keep": Rule("an integer >= -1 (-1 keeps all)", lambda v: _is_int(v) and v >= -1),
    "perf.peak_tflops": _optional(_num("a number > 0", lambda v: v > 0)),
    "tracking.uri": _optional(_STR),
    "tracking.experiment": _STR,
    "tracking.run_name": _optional(_STR),
    "tracking.tags": Rule("a mapping of tag names to values", lambda v: isinstance(v, Mapping)),
}


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


def load_config(
    path: str | Path, overrides: Sequence[str] = (), *, validate: bool = True, with_sources: bool = False
):
    """Load, merge and validate an experiment: an OmegaConf DictConfig (and, with ``with_sources``, the
    ``Sources`` that say which file set each key).

    ``cfg.name`` defaults to the file stem plus the normalised overrides (``run_name``), so sweeps read well
    in the MLflow UI and two different override sets never share a run folder.
    """
    from omegaconf import OmegaConf

    path = Path(path)
    sources = Sources(str(path))
    user = _load_with_bases(path, sources)
    over = parse_overrides(overrides)
    for extra in _command_line_bases(over.pop("base", None)):  # base=FILE: that file over this one
        user = merge(user, _load_with_bases(extra, sources))
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
        check_components(conf, sources, search=(str(path.parent), "."))
    return (conf, sources) if with_sources else conf


def _command_line_bases(value: Any) -> list[Path]:
    """``base=FILE`` or ``base=[A,B]`` on the command line: experiment files (relative to the working
    directory) merged over the experiment file, in order, before the other overrides: the command-line form of
    a file whose ``base:`` lists the experiment and then these."""
    if value is None:
        return []
    names = value if isinstance(value, list) else [value]
    out = []
    for name in names:
        file = Path(str(name))
        if not isinstance(name, str) or not file.is_file():
            raise ChimeraError(
                f"command line: base={name}: not an experiment file (looked for {file.resolve()}); base= "
                "names YAML files, relative to the working directory",
                key="base",
            )
        out.append(file.resolve())
    return out


def run_name(path: Path, overrides: Sequence[str]) -> str:
    """The run's folder name: the file stem plus the full, normalised override set.

    Overrides are parsed (so ``lr=0.001`` and ``lr=1e-3`` agree), sorted by their full dotted key (so order
    does not matter) and written ``stem-key=value-key=value``. When that text is long or had to be changed to
    be a safe folder name, a short hash of the normalised set keeps names of different runs apart.
    """
    flat = _flatten(parse_overrides(overrides)) if overrides else {}
    flat.pop("name", None)
    flat.pop("output_dir", None)  # already the folder's parent
    if not flat:
        return _safe(path.stem)[0] or "run"
    items = sorted(flat.items())
    text = "-".join(
        f"{k}={json.dumps(v, separators=(',', ':')) if not isinstance(v, str) else v}" for k, v in items
    )
    name, changed = _safe(f"{path.stem}-{text}")
    if changed or len(name) > 120:
        digest = hashlib.sha1(json.dumps(items, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name[:100]}-{digest}"
    return name


def _safe(text: str) -> tuple[str, bool]:
    """Replace characters a folder name should not have; (name, whether anything changed)."""
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text).lstrip(".")
    return safe, safe != text


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def check_keys(user: Mapping[str, Any], sources: Sources) -> None:
    """Every key the user wrote must exist in DEFAULTS (component nodes are checked later), with a value of
    the type and range ``RULES`` gives; stages are checked section by section like the top level."""
    _walk(user, {**DEFAULTS, "base": None}, "", sources, where="")


def _walk(
    node: Mapping[str, Any], schema: Mapping[str, Any], prefix: str, sources: Sources, where: str
) -> None:
    """Check ``node`` (keys ``prefix.*``) against ``schema``; ``where`` prefixes messages (a stage)."""
    at = f"{where}: " if where else ""
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if dotted in COMPONENT_NODES or dotted in _FREE_FORM:
            continue
        if dotted == "stages" and not where:
            check_stages(value, sources)
            continue
        if dotted == "trainer":
            check_trainer(value, sources, where=where)
            for name, item in value.items():
                _check_value(f"trainer.{name}", item, sources, at)
            continue
        if key not in schema:
            raise ChimeraError(
                f"{sources.of(dotted)}: {at}{dotted}: unknown key{did_you_mean(key, schema)}; "
                f"known keys{' of ' + prefix if prefix else ''}: {', '.join(map(str, schema))}",
                key=dotted,
            )
        if dotted in RULES:
            _check_value(dotted, value, sources, at)
        elif isinstance(schema.get(key), Mapping) and value is not None:
            if not isinstance(value, Mapping):
                raise ChimeraError(
                    f"{sources.of(dotted)}: {at}{dotted}: expected a mapping, got {value!r:.80}"
                )
            _walk(value, schema[key], dotted, sources, where)


def _check_value(dotted: str, value: Any, sources: Sources, at: str) -> None:
    rule = RULES.get(dotted)
    if rule is not None and not rule.ok(value):
        raise ChimeraError(
            f"{sources.of(dotted)}: {at}{dotted}: expected {rule.text}, got {value!r:.80}", key=dotted
        )


def check_trainer(node: Any, sources: Sources, where: str = "") -> None:
    """Trainer keys are Lightning ``Trainer`` arguments (those Chimera does not set itself)."""
    at = f"{where}: " if where else ""
    if not isinstance(node, Mapping):
        raise ChimeraError(f"{sources.of('trainer')}: {at}trainer: expected a mapping, got {node!r}")
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
                f"{sources.of(f'trainer.{key}')}: {at}trainer.{key}: not an argument of lightning.Trainer"
                f"{did_you_mean(key, accepted)} (strategy, logger and callbacks come from Chimera's own sections)",
                key=f"trainer.{key}",
            )


def stage_label(index: int, stage: Mapping[str, Any]) -> str:
    """How errors name a stage: ``stages[1] (instruct)``."""
    return f"stages[{index}] ({stage.get('name')})" if isinstance(stage, Mapping) else f"stages[{index}]"


def check_stages(stages: Any, sources: Sources) -> None:
    """Each stage: a mapping with a unique name and only stage keys; its ``data``, ``optim``, ``trainer`` and
    ``model`` sections checked exactly like the top level's (component nodes later, per stage config)."""
    file = sources.of("stages")
    if not isinstance(stages, list):
        raise ChimeraError(f"{file}: stages: expected a list of stage mappings, got {stages!r}")
    seen = set()
    for i, stage in enumerate(stages):
        where = stage_label(i, stage)
        if not isinstance(stage, Mapping) or not stage.get("name"):
            raise ChimeraError(f"{file}: stages[{i}]: each stage needs a mapping with a 'name'")
        if stage["name"] in seen:
            raise ChimeraError(f"{file}: {where}: duplicate stage name '{stage['name']}'")
        seen.add(stage["name"])
        for key in stage:
            if key not in STAGE_KEYS:
                raise ChimeraError(
                    f"{file}: {where}: {key}: unknown stage key{did_you_mean(key, STAGE_KEYS)}; "
                    f"known: {', '.join(sorted(STAGE_KEYS))}"
                )
        if not _GLOBS.ok(stage.get("trainable")):
            raise ChimeraError(f"{file}: {where}: trainable: expected {_GLOBS.text}")
        sections = {k: v for k, v in stage.items() if k in STAGE_SECTIONS}
        stage_sources = Sources(file)  # every key of a stage was set by the file that set `stages`
        _walk(sections, {k: DEFAULTS[k] for k in STAGE_SECTIONS}, "", stage_sources, where=where)


def check_components(cfg: Any, sources: Sources, search: Sequence[str] = ()) -> None:
    """Check every component node against its registered constructor, without building anything.

    ``search``: folders where ``plugins:`` modules are looked up besides ``sys.path``.
    """
    from omegaconf import OmegaConf

    from toolkit import registry

    registry.import_plugins(
        cfg.get("plugins") or [], where=f"{sources.of('plugins')}: plugins", search=search
    )
    from toolkit.convert import prepare_node, validate_init

    if cfg.model.get("init") is not None:
        try:
            validate_init("model", OmegaConf.to_container(cfg.model.init, resolve=True), "model")
        except ChimeraError as exc:
            raise ChimeraError(f"{sources.of(exc.key or 'model.init')}: {exc}", key=exc.key) from exc
    for dotted, kind in COMPONENT_NODES.items():
        node = OmegaConf.select(cfg, dotted)
        if node is None:
            if dotted == "data.val":
                continue
            raise ChimeraError(
                f"{sources.default}: {dotted}: missing; set it to {{name: <a registered {kind}>, ...}}"
            )
        try:
            if dotted.startswith("model."):  # `init:` (pretrained weights) is the toolkit's, not the part's
                node, _ = prepare_node(
                    dotted.split(".")[1], OmegaConf.to_container(node, resolve=True), dotted
                )
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
