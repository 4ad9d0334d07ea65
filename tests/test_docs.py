"""Every example in README.md, CONTRIBUTING.md and docs/ runs as written.

Fenced ``bash`` blocks: each ``chimera ...`` command (also after ``srun``/``torchrun ... -m toolkit.cli``) is
run in this process: ``describe``/``components`` for real, ``train`` up to its plan (config loaded, every
stage validated, the model built on the meta device; training itself is the other tests' job), ``bench``
parsed. Fenced ``yaml`` blocks: a whole experiment is planned as written (relative ``base:`` paths resolve
from ``experiments/``); a fragment (a ``decoder:`` or section block) is laid over the quick start first.
Lines with a placeholder in capitals (CONFIG, RUN, FILE) are patterns, not commands, and are skipped.
"""

from __future__ import annotations

import re
import shlex
import shutil

import pytest
import yaml

from tests.conftest import ROOT
from toolkit.cli import main, parser
from toolkit.config import DEFAULTS
from toolkit.model import PARTS
from toolkit.plan import load_plan

DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]{2,}\b")
MODEL_PARTS = set(PARTS)


def _blocks(lang: str) -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == lang:
                out.append((doc.name, text[: m.start()].count("\n") + 1, m.group(2)))
    return out


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for name, line, block in _blocks("bash"):
        for i, raw in enumerate(block.splitlines()):
            cmd = re.split(r"\s(?:>|\||&&|;)\s", raw.split(" #")[0])[
                0
            ].strip()  # a redirect or a pipe ends it
            if "chimera " not in cmd and "toolkit.cli" not in cmd:
                continue
            words = shlex.split(cmd)
            if "chimera" in words:
                args = words[words.index("chimera") + 1 :]
            elif "toolkit.cli" in words:
                args = words[words.index("toolkit.cli") + 1 :]
            else:
                continue
            if not args or PLACEHOLDER.search(" ".join(args)) or any(w in ("\\", "...") for w in args):
                continue
            found.append((f"{name}:{line + i + 1}", args))
    return found


COMMANDS = _commands()


@pytest.mark.parametrize("where, args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs(where, args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    parsed = parser().parse_args(args)  # every documented command parses
    if parsed.command in ("describe", "components", "plan"):
        assert main(args) == 0, capsys.readouterr().err
    elif parsed.command == "train" and isinstance(parsed.resume, str):
        assert parsed.config is None and not parsed.overrides  # --resume RUN takes the run's own config
    elif parsed.command == "ablate":  # every run planned (no model built), its commands printed
        from toolkit.ablation import run_ablation

        overrides = [*parsed.overrides, f"output_dir={tmp_path}"]
        assert run_ablation(parsed.file, overrides, dry_run=True, only=parsed.only, seeds=parsed.seeds) == 0
    elif parsed.command == "train":
        plan = load_plan(parsed.config, [*parsed.overrides, f"output_dir={tmp_path}"])
        if parsed.stage:
            plan.stage(parsed.stage)


def _experiments() -> list[tuple[str, dict]]:
    found = []
    for name, line, block in _blocks("yaml"):
        if PLACEHOLDER.search(block):  # a pattern with paths to fill in (HF_MODEL_DIR), not a runnable file
            continue
        data = yaml.safe_load(block)
        if isinstance(data, dict):
            found.append((f"{name}:{line}", data))
    return found


EXPERIMENTS = _experiments()


@pytest.mark.parametrize("where, data", EXPERIMENTS, ids=[w for w, _ in EXPERIMENTS])
def test_documented_yaml_plans(where, data, tmp_path):
    experiments = tmp_path / "experiments"
    shutil.copytree(ROOT / "experiments", experiments)
    if {"variants", "grid"} & set(
        data
    ):  # an ablation file (docs/ablations.md): base: beside the shipped ones
        from toolkit.ablation import check, load_ablation, make_jobs

        path = experiments / "longllava" / "ablations" / "doc_example.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        check(make_jobs(load_ablation(path, [f"output_dir={tmp_path / 'runs'}"])))
        return
    if set(data) <= MODEL_PARTS:
        data = {"model": data}
    if set(data) <= {"name", "model", "data", "optim", "trainer", "strategy", "checkpoint", "tracking"} and (
        "model" not in data or not set(data["model"]) >= MODEL_PARTS
    ):  # a fragment: laid over the quick start
        data = {"base": ["quickstart.yaml"], **data}
    unknown = set(data) - set(DEFAULTS) - {"base", "plugins"}
    assert not unknown, f"{where}: not an experiment or a section fragment: {sorted(unknown)}"
    path = experiments / "doc_example.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_plan(path, [f"output_dir={tmp_path / 'runs'}"])


def test_the_docs_have_examples():
    assert len(COMMANDS) >= 10 and len(EXPERIMENTS) >= 2


def test_configs_md_lists_every_typed_key():
    from toolkit.config import RULES

    text = (ROOT / "docs" / "configs.md").read_text()
    for key, rule in RULES.items():
        assert f"| `{key}` | {rule.text} |" in text, key


def test_every_test_named_in_the_reliability_table_exists():
    import ast

    defined = {
        node.name
        for path in (ROOT / "tests").rglob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }
    named = re.findall(r"`(test_\w+)`", (ROOT / "docs" / "reliability.md").read_text())
    assert len(named) >= 15
    assert sorted(set(named) - defined) == []
