# The two quick-start commands (README): both install into .venv first when needed.
PY := .venv/bin/python
STAMP := .venv/.chimera-installed

.PHONY: train test lint format

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	.venv/bin/chimera train experiments/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

lint: $(STAMP)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: $(STAMP)
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
