#!/usr/bin/env bash
# Installs ggserve into a new venv from the wheels deploy/build-wheels.sh wrote: no compiler,
# no network (--no-index). The Dockerfile's runtime stage runs this.
#
# Usage: deploy/install-runtime.sh WHEELS PREFIX   (then PREFIX/bin/ggserve, and
#   PREFIX/bin/ggml-rpc-server, llama.cpp's RPC worker, when WHEELS/bin has it)
set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: $0 WHEELS PREFIX" >&2; exit 2; }
"${PYTHON:-python3}" -m venv "$2"
"$2/bin/python" -m pip install --no-cache-dir --no-index --find-links "$1" ggserve
if [[ -x $1/bin/ggml-rpc-server ]]; then
  install -m 0755 "$1/bin/ggml-rpc-server" "$2/bin/ggml-rpc-server"
fi
