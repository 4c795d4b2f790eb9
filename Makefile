# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VISALIGN_CACHE ?= $(CURDIR)/.cache/visalign

.PHONY: venv test test-slow lint format demo clean

$(STAMP): pyproject.toml devtools/constraints-cpu.txt devtools/install.sh
	PY=$(PY) VENV=$(VENV) bash devtools/install.sh
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash jobs/demo.sh

clean:
	rm -rf $(VENV) .cache demo-out .pytest_cache
