#!/usr/bin/env bash
# Builds llama.cpp's RPC worker, ggml-rpc-server, from the source of the llama-cpp-python
# version PYTHON has installed, linked to that install's own ggml libraries: worker and server
# run the same ggml and speak the same RPC protocol. One C++ file: seconds, not a llama.cpp
# build. The install must have been built with -DGGML_RPC=ON (make and build-wheels.sh do).
#
# Usage: deploy/build-rpc-server.sh OUT [LIBDIR [RPATH]]
#   OUT     the binary to write, e.g. .venv/bin/ggml-rpc-server
#   LIBDIR  the install's llama_cpp/lib (default: the one PYTHON imports)
#   RPATH   where the binary finds those libraries at run time (default: LIBDIR relative to
#           OUT's folder, through $ORIGIN)
# Environment: PYTHON (python3), CXX (c++), LLAMA_CPP_VERSION (default: the one PYTHON has),
#   LLAMA_CPP_SDIST (a llama-cpp-python sdist of that version; default: pip downloads it, from
#   its cache when pip has just built the install).
#
# ggml-rpc-server has no authentication and no encryption: never let an untrusted network
# reach it (README, "Across machines").
set -euo pipefail

[[ $# -ge 1 && $# -le 3 ]] || { echo "usage: $0 OUT [LIBDIR [RPATH]]" >&2; exit 2; }
out=$1
python=${PYTHON:-python3}
libdir=${2:-$("$python" -c 'import llama_cpp, pathlib
print(pathlib.Path(llama_cpp.__file__).parent / "lib")')}
version=${LLAMA_CPP_VERSION:-$("$python" -c 'import importlib.metadata as m
print(m.version("llama-cpp-python"))')}
if [[ ! -e $libdir/libggml-rpc.so ]]; then
  echo "$0: no libggml-rpc.so in $libdir: llama-cpp-python $version was built without" \
       "GGML_RPC; reinstall it with CMAKE_ARGS=\"-DGGML_RPC=ON\"" >&2
  exit 1
fi
mkdir -p "$(dirname "$out")"
rpath=${3:-\$ORIGIN/$(realpath --relative-to="$(dirname "$(realpath -m "$out")")" "$libdir")}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sdist=${LLAMA_CPP_SDIST:-}
if [[ -z $sdist ]]; then
  "$python" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" \
    "llama-cpp-python==$version"
  sdist=$(echo "$work"/llama_cpp_python-*.tar.gz)
fi
src=llama_cpp_python-$version/vendor/llama.cpp
tar -xzf "$sdist" -C "$work" "$src/tools/rpc/rpc-server.cpp" "$src/ggml/include"
"${CXX:-c++}" -O2 -std=c++17 -pthread -I"$work/$src/ggml/include" \
  "$work/$src/tools/rpc/rpc-server.cpp" -o "$out" \
  -L"$libdir" -lggml -lggml-base -Wl,-rpath,"$rpath"
echo "build-rpc-server: $out (llama.cpp of llama-cpp-python $version)"
