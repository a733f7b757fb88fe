# phi-pipeline: `make finetune-and-export [TARGET=cpu] [PIPELINE=pipelines/tiny-phi3.yaml]`, `make test`.
# Several targets from one training: `make finetune-and-export TARGETS=cpu,cuda` (also writes an ORT model package).
# Everything runs from a local virtual environment built from pyproject.toml's exact pins.

PYTHON   ?= python3
TARGET   ?= cpu
PIPELINE ?= pipelines/tiny-phi3.yaml
PYTEST_ARGS ?=
comma := ,
TARGETS  ?= $(TARGET)
# The venv is the one of the last target named: its runtime build (e.g. onnxruntime-gpu) also runs the CPU EP.
VENV_TARGET := $(lastword $(subst $(comma), ,$(TARGETS)))

# What TARGET builds with, read from the target table (phi_pipeline/pipeline_spec/targets.py is plain Python, so the
# system interpreter reads it before any venv exists): its pyproject extras, the venv they go in (one
# per set of extras: the CPU and CUDA onnxruntime builds install the same modules), and the dependency
# group of a second venv that some export passes run in ("-": none). EXTRAS=cpu,qlora adds extras.
TARGET_INFO := $(shell $(PYTHON) -c 'from phi_pipeline.pipeline_spec.targets import get_target; t = get_target("$(VENV_TARGET)"); \
	print(",".join(t.install_extras), t.venv, t.pass_venv or "-", t.pass_environment or "-")')
$(if $(TARGET_INFO),,$(error TARGET=$(VENV_TARGET) is not a target of phi_pipeline/pipeline_spec/targets.py))
EXTRAS   ?= $(word 1,$(TARGET_INFO))
VENV     ?= $(word 2,$(TARGET_INFO))
PASS_VENV  := $(filter-out -,$(word 3,$(TARGET_INFO)))
PASS_GROUP := $(filter-out -,$(word 4,$(TARGET_INFO)))

BIN := $(VENV)/bin
# torch goes in first, alone: pip then takes the local CPU build instead of a multi-GB CUDA one.
TORCH_PIN := $(shell grep -m1 -o '"torch==[0-9.]*"' pyproject.toml | tr -d '"')

.PHONY: venv web finetune-and-export configs test bench bench-peer bench-real-peer bench-browser serve clean

$(VENV)/.installed-$(subst $(comma),-,$(EXTRAS)): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev,$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

# The in-browser page's JavaScript packages (onnxruntime-web, tokenizers, jinja, flatbuffers), exactly as
# phi_pipeline/web/package-lock.json pins them; no CDN at run time. Without npm this says so and goes on: the
# tests that need the packages skip and say why, and /web/ answers what to install.
WEB_DIR := phi_pipeline/web
$(WEB_DIR)/node_modules/.package-lock.json: $(WEB_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then cd $(WEB_DIR) && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "note: npm is missing, so the in-browser page's packages are not installed (apt-get install nodejs npm, then make web)" >&2; fi

web: $(WEB_DIR)/node_modules/.package-lock.json

ifneq ($(PASS_VENV),)
# Only the dependency group, not phi-pipeline: Olive runs passes there by subprocess.
# optimum-intel pulls in torchvision, whose PyPI Linux wheel is built for CUDA torch: beside the CPU torch
# its ops fail to load and transformers then refuses to import. Nothing the export passes run uses it.
PASS_UNINSTALL := torchvision
$(PASS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PASS_VENV)
	$(PASS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PASS_VENV)/bin/python -m pip install -q "$(TORCH_PIN)"
	$(PASS_VENV)/bin/python -m pip install -q --group $(PASS_GROUP)
	$(PASS_VENV)/bin/python -m pip uninstall -q -y $(PASS_UNINSTALL)
	touch $@

venv: $(PASS_VENV)/.installed
endif

finetune-and-export: venv
	$(BIN)/phi-pipeline run $(PIPELINE) --target $(TARGETS) $(if $(findstring $(comma),$(TARGETS)),--package)

# Regenerate the committed Olive workflow configs of every shipped spec and target.
configs: venv
	$(BIN)/phi-pipeline configs --all

# The tests execute the cpu, openvino and qnn targets end to end, so `make test` first installs what those
# need: the qnn and openvino extras in the main venv and the openvino target's pass venv (.venv-openvino,
# about 1.9 GB; make's stamps skip what is installed already).
test: venv web
	$(MAKE) venv TARGET=openvino PYTHON=$(PYTHON)
	$(MAKE) venv TARGET=qnn PYTHON=$(PYTHON)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmark a bundle (built first if missing) and a 150M Phi-3-shaped model: bench/results.json,
# bench/report.md, bench/decode.png. About 15 minutes on 2 cores; BENCH_ARGS="--size 300m --reps 5" etc.
BUNDLE ?= dist/tiny-phi3/$(TARGET)
BENCH_ARGS ?=
bench: venv
	@test -f $(BUNDLE)/manifest.json || $(MAKE) finetune-and-export
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/phi-pipeline bench $(BUNDLE) $(BENCH_ARGS)

# Serve the bundle (built first if missing) with an OpenAI-compatible API on http://127.0.0.1:8000 (chat page at /,
# the model running in the browser at /web/ for cpu and webgpu bundles); SERVE_ARGS="--port 9000 --threads 2" etc.
SERVE_ARGS ?=
serve: venv web
	@test -f $(BUNDLE)/manifest.json || $(MAKE) finetune-and-export
	$(BIN)/phi-pipeline serve $(BUNDLE) $(SERVE_ARGS)

# The same benchmark plus llama.cpp on the same model, interleaved: builds llama.cpp once into
# .phi-pipeline/bench/llama.cpp (cmake, about 5 minutes on 2 cores) and converts the base to GGUF;
# each round also runs the variants tried against it (phi_pipeline/bench/tuning.py): about a minute a round for
# the 150m base; BENCH_ARGS="--peer-rounds 10" for more rounds (default 5; the committed run used 10, 26 minutes).
bench-peer:
	$(MAKE) venv EXTRAS=$(EXTRAS),peer
	@test -f $(BUNDLE)/manifest.json || $(MAKE) finetune-and-export
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/phi-pipeline bench $(BUNDLE) --peer llama.cpp $(BENCH_ARGS)

# The shipped SmolLM2 bundle (built first if missing) against llama.cpp on the same GGUF: perplexity on identical
# tokens, decode and first-token speed with and without an adapter, an 8-client multi-turn chat against
# llama-server (bench/real_peer.py -> bench/real-peer.json); REAL_PEER_ARGS="--sections quality" etc.
REAL_PEER_ARGS ?=
bench-real-peer:
	$(MAKE) venv EXTRAS=$(EXTRAS),peer
	@test -f dist/smollm2/cpu/manifest.json || $(MAKE) finetune-and-export PIPELINE=pipelines/smollm2.yaml
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python bench/real_peer.py dist/smollm2/cpu $(REAL_PEER_ARGS)

# The page's speed in headless chromium (WASM backend) against the Python runtime on the same bundle and machine:
# bench/browser.json (phi_pipeline/bench/browser.py); BROWSER_ARGS="--rounds 5" etc.
BROWSER_ARGS ?=
bench-browser: venv web
	@test -f $(BUNDLE)/manifest.json || $(MAKE) finetune-and-export
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m phi_pipeline.bench.browser $(BUNDLE) $(BROWSER_ARGS)

clean:
	rm -rf .phi-pipeline dist
