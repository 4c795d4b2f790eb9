# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VISALIGN_CACHE ?= $(CURDIR)/.cache/visalign

.PHONY: venv test test-slow lint format demo check-env clean

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

# the heavy imports (torchvision through the dev shim) and a 2-process accelerate launch (gloo on CPU)
check-env: $(STAMP)
	$(BIN)/python -c "import open_clip, timm, transformers; from transformers import CLIPModel, LlavaForConditionalGeneration; print('imports ok')"
	$(BIN)/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no devtools/check_launch.py

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash jobs/demo.sh

clean:
	rm -rf $(VENV) .cache demo-out .pytest_cache
