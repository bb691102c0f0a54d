# Two entry points for a fresh machine: `make run` (main job on the default config) and `make test`.
VENV ?= .venv
PYTHON ?= python3
CONFIG ?= configs/default.yaml
STAMP := $(VENV)/.installed

.PHONY: install run smoke test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv --upgrade-deps $(VENV)
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cmce run --config $(CONFIG)

smoke: $(STAMP)
	$(VENV)/bin/cmce run --config configs/smoke.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

test: lint
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf runs
