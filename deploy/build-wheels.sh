#!/usr/bin/env bash
# Builds wheels of ggserve and of every dependency, llama-cpp-python compiled from source for
# one variant, so that deploy/install-runtime.sh can install them with no compiler and no
# network. The Dockerfile's build stage runs this; so can any Linux host with Python >= 3.11,
# a C/C++ toolchain, CMake and (for cuda) the CUDA toolkit.
#
# Usage: deploy/build-wheels.sh cpu|cuda OUT [deps|app|all]
#   deps  the dependencies of pyproject.toml (needs only pyproject.toml: the Dockerfile caches
#         this slow layer apart from the code), and OUT/bin/ggml-rpc-server: llama.cpp's RPC
#         worker linked to that llama-cpp-python (deploy/build-rpc-server.sh)
#   app   the ggserve wheel itself
#   all   both (default)
# Environment: CUDA_ARCHITECTURES (cuda; default "75;80;86;89;90;120": Turing to Blackwell),
#   EXTRA_CMAKE_ARGS (appended to CMAKE_ARGS, so a later -D overrides ours), PYTHON (python3).
set -euo pipefail

usage() { echo "usage: $0 cpu|cuda OUT [deps|app|all]" >&2; exit 2; }
[[ $# -ge 2 && $# -le 3 ]] || usage
variant=$1
out=$2
step=${3:-all}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Portable x86-64 code (AVX2 era) instead of -march=native: the image runs on other CPUs than
# the one that built it. No AMX kernels are compiled (no GGML_AMX_*): their weight repacking
# segfaults on AMX CPUs. mtmd (vision) is not used. GGML_RPC: models split across machines.
cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
cmake_args+=" -DLLAVA_BUILD=OFF -DGGML_RPC=ON"
case $variant in
  cpu) ;;
  cuda) cmake_args+=" -DGGML_CUDA=on"
        cmake_args+=" -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES:-75;80;86;89;90;120}" ;;
  *) usage ;;
esac
case $step in deps|app|all) ;; *) usage ;; esac
export CMAKE_ARGS="$cmake_args ${EXTRA_CMAKE_ARGS:-}"

# pip runs in a throwaway venv: distribution Pythons refuse to install into themselves (PEP 668).
build_venv=$(mktemp -d)
trap 'rm -rf "$build_venv"' EXIT
"${PYTHON:-python3}" -m venv "$build_venv"
pip=("$build_venv/bin/python" -m pip wheel --no-cache-dir --progress-bar off --wheel-dir "$out")
mkdir -p "$out"

if [[ $step != app ]]; then
  echo "build-wheels: $variant dependencies, CMAKE_ARGS=$CMAKE_ARGS"
  # The requirements exactly as pyproject.toml pins them (llama-cpp-python's version range
  # included); --no-binary: always compile llama.cpp here, with the flags above, never take a
  # prebuilt wheel some index or --find-links offers.
  "$build_venv/bin/python" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
' "$repo/pyproject.toml" >"$build_venv/requirements.txt"
  "${pip[@]}" --no-binary llama-cpp-python --requirement "$build_venv/requirements.txt"
  # The RPC worker, for the image's PREFIX/bin: linked to the libraries of the wheel above,
  # found through the venv layout install-runtime.sh makes (PREFIX/lib/pythonX.Y/...).
  wheel=$(echo "$out"/llama_cpp_python-*.whl)
  version=$(basename "$wheel" | cut -d- -f2)
  python_dir=$("$build_venv/bin/python" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
  "$build_venv/bin/python" -m zipfile -e "$wheel" "$build_venv/llama-cpp"
  LLAMA_CPP_VERSION=$version PYTHON="$build_venv/bin/python" "$repo/deploy/build-rpc-server.sh" \
    "$out/bin/ggml-rpc-server" "$build_venv/llama-cpp/llama_cpp/lib" \
    "\$ORIGIN/../lib/$python_dir/site-packages/llama_cpp/lib"
fi
if [[ $step != deps ]]; then
  echo "build-wheels: ggserve"
  "${pip[@]}" --no-deps "$repo"
fi
ls -l "$out"
