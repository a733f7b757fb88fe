# phi-pipeline: `make finetune-and-export [TARGET=cpu] [PIPELINE=pipelines/tiny-phi3.yaml]`, `make test`.
# Everything runs from a local virtual environment built from pyproject.toml's exact pins.

PYTHON   ?= python3
VENV     ?= .venv
TARGET   ?= cpu
PIPELINE ?= pipelines/tiny-phi3.yaml
PYTEST_ARGS ?=

BIN := $(VENV)/bin
# torch goes in first, alone: pip then takes the local CPU build instead of a multi-GB CUDA one.
TORCH_PIN := $(shell grep -o '"torch==[0-9.]*"' pyproject.toml | tr -d '"')

.PHONY: venv finetune-and-export configs test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

finetune-and-export: venv
	$(BIN)/phi-pipeline run $(PIPELINE) --target $(TARGET)

# Regenerate the committed Olive workflow configs of every shipped spec and target.
configs: venv
	$(BIN)/phi-pipeline configs --all

test: venv
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf .phi-pipeline dist
