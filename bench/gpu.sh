#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md ("gpu"), in ONE command on the GPU machine (600 s at most).
# Prepare here first: `bash ../shared/gpu/prepare.sh` (writes .gpu/: the pinned llama-cpp-python
# source trimmed for a CUDA build and the wheels missing there); then, with .gpu carried along:
#   bash bench/gpu.sh
# It builds llama.cpp with CUDA for sm_90 (libraries and llama-server) while it writes the two
# random-weight Q4_K_M models (tests/gguf_factory.py: Mistral-7B and StableLM-3B shapes,
# llama-quantize's tensor mix), then runs, each stage in the time left:
#   1. bench/serve.py, 7B: ggserve vs llama-server (-ngl 999) at 1, 8 and 32 streams
#   2. bench/step_profile.py, 7B on the GPU: µs per step by part, 1 and 32 sequences, backend
#      sampling on (the server's default on a GPU) and off
#   3. bench/serve.py, StableLM-3B at 1 and 32 streams
#   4. the GPU tests (pytest -m gpu)
# STAGES picks and orders them (default "serve7b profile7b serve3b tests"); more:
#   isolation  bench/isolation.py on the GPU with .gpu/smollm2-cut.gguf (bench/cut_model.py,
#              written here first: the default model itself is too large to travel), ggserve
#              and llama-server
#   isolation-cpu  the same on the host's CPU (CUDA_VISIBLE_DEVICES=""), 8 threads each
#   host-gpu   bench/serve.py --mode host: the tiny model on the GPU in both servers
#   host-cpu   the same on the CPU (CUDA_VISIBLE_DEVICES=""), 2 threads on a 16-core host
#   load-probe bench/gpu_load_probe.py: which process state makes the GPU tests' model load crash
#   gaps, gaps7b  bench/gaps.py (filler rows between running sequences), tiny model / 7B shape
# e.g. STAGES="load-probe tests gaps isolation isolation-cpu" bash bench/gpu.sh
# Everything lands in $OUT (run.log, the servers' logs).
# DRY=1 LLAMA_SERVER=<a CPU llama-server> rehearses the stages here first, on the CPU with this
# checkout's .venv and no build: a stage that fails on its arguments fails here, not in the
# GPU machine's few minutes.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; exec > >(tee -a "$OUT/run.log") 2>&1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
LIMIT=${LIMIT:-585}; left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
W=/tmp/gpu; mkdir -p "$W"
STAGES=" ${STAGES:-serve7b profile7b serve3b tests} "; want() { [[ $STAGES == *" $1 "* ]]; }
if [ -n "${DRY:-}" ]; then  # a rehearsal here, on the CPU: this checkout's .venv, no build
  : "${LLAMA_SERVER:?DRY=1 needs LLAMA_SERVER (a CPU llama-server)}"
  export PATH="$PWD/.venv/bin:$PATH" PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
else
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f "$W/lcp/vendor/llama.cpp/CMakeLists.txt" ] || { rm -rf "$W/lcp"; mkdir -p "$W/lcp";
  tar xzf .gpu/lcp.tgz -C "$W/lcp" --strip-components=1; }
[ -f "$W/site/.ok" ] && [ -d "$W/site/opentelemetry" ] || { python3 -m pip install -q --no-index --no-deps --no-compile \
  --target "$W/site" .gpu/wheels/*.whl && touch "$W/site/.ok"; } || exit 1
export PYTHONPATH="$PWD:$W/lcp:$W/site" LLAMA_CPP_LIB_PATH="$W/build/bin" PYTHONUNBUFFERED=1
export LLAMA_SERVER="$W/build/bin/llama-server"
fi
M7="$W/mistral7b.Q4_K_M.gguf"; M3="$W/stablelm3b.Q4_K_M.gguf"
(  # the models, while llama.cpp builds (numpy and gguf only)
  if want serve7b || want profile7b || want gaps7b && [ ! -f "$M7" ]; then python3 -m tests.gguf_factory --arch llama --shape mistral-7b \
    --dtype q4_k_m --vocab-size 32000 "$M7.part" && mv "$M7.part" "$M7"; fi
  if want serve3b && [ ! -f "$M3" ]; then python3 -m tests.gguf_factory --arch stablelm --shape stablelm-3b \
    --dtype q4_k_m --vocab-size 50304 "$M3.part" && mv "$M3.part" "$M3"; fi
) > "$OUT/synth.log" 2>&1 &
SYNTH=$!
if [ ! -x "$LLAMA_SERVER" ]; then
  el "cmake (CUDA, sm_90)"
  cmake -S "$W/lcp/vendor/llama.cpp" -B "$W/build" -G Ninja -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release > "$OUT/cmake.log" 2>&1 \
    || { tail -30 "$OUT/cmake.log"; exit 1; }
  cmake --build "$W/build" -j"$(nproc)" --target llama-server > "$OUT/build.log" 2>&1 \
    || { grep -m5 -B2 -A8 "FAILED\|error" "$OUT/build.log"; exit 1; }
  el "built"
fi
wait $SYNTH; cat "$OUT/synth.log"; ls -la "$W"/*.gguf
python3 -c "import llama_cpp; print('llama.cpp GPU offload:', llama_cpp.llama_supports_gpu_offload())"

stage() {  # stage NAME MIN MAX CMD...: run CMD for at most MAX s, if MIN s are left
  local name=$1 need=$2 most=$3 t; shift 3
  if [ "$(left)" -lt "$need" ]; then el "skipped $name: $(left) s left"; return; fi
  t=$(left); [ "$t" -gt "$most" ] && t=$most
  el "$name"; timeout "$t" "$@"; el "$name: rc $?"
  mkdir -p "$W/logs/$name"; cp /tmp/bench-*.log "$W/logs/$name/" 2>/dev/null
}
for name in $STAGES; do case $name in
serve7b) stage "serve, Mistral-7B shape" 120 240 python3 bench/serve.py --model "$M7" \
  --llama-server "$LLAMA_SERVER" --servers ggserve,llama-server --concurrency 1,8,32 \
  --max-tokens 256 --threads 8 --repeat 3 --label gpu ;;
profile7b)
  stage "step profile, Mistral-7B shape, backend sampling" 30 60 python3 bench/step_profile.py \
    --model "$M7" --gpu-layers -1 --threads 8 --max-tokens 128 --sequences 1 32 --backend-sampling
  stage "step profile, Mistral-7B shape, CPU sampling" 30 60 python3 bench/step_profile.py \
    --model "$M7" --gpu-layers -1 --threads 8 --max-tokens 128 --sequences 1 32 ;;
serve3b) stage "serve, StableLM-3B shape" 60 150 python3 bench/serve.py --model "$M3" \
  --llama-server "$LLAMA_SERVER" --servers ggserve,llama-server --concurrency 1,32 \
  --max-tokens 256 --threads 8 --repeat 2 --label gpu ;;
isolation) stage "grammar isolation, cut default model" 40 180 python3 bench/isolation.py \
  --model .gpu/smollm2-cut.gguf --rounds 3 --max-tokens 256 --llama-server "$LLAMA_SERVER" \
  --llama-server-args=--no-repack ;;
isolation-cpu) stage "grammar isolation, cut default model, CPU, 8 threads" 40 180 \
  env CUDA_VISIBLE_DEVICES= python3 bench/isolation.py --model .gpu/smollm2-cut.gguf \
  --rounds 3 --server-args="--threads 8" --llama-server "$LLAMA_SERVER" \
  --llama-server-args="-t 8 -tb 8 --no-repack" ;;
host-gpu) stage "host work per token, tiny model on the GPU" 40 120 python3 bench/serve.py \
  --mode host --llama-server "$LLAMA_SERVER" --label gpu ;;
host-cpu) stage "host work per token, tiny model, CPU, 2 threads" 40 120 \
  env CUDA_VISIBLE_DEVICES= python3 bench/serve.py --mode host --llama-server "$LLAMA_SERVER" ;;
load-probe) stage "GPU load probe" 20 120 python3 bench/gpu_load_probe.py ;;
gaps) stage "gaps between running sequences, tiny model" 30 120 python3 bench/gaps.py \
  --llama-server "$LLAMA_SERVER" ;;
gaps7b) stage "gaps between running sequences, Mistral-7B shape" 60 150 python3 bench/gaps.py \
  --model "$M7" --threads 8 --max-tokens 128 --rounds 2 --llama-server "$LLAMA_SERVER" ;;
tests) stage "GPU tests" 30 120 python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_devices.py tests/engine/test_sampling.py ;;
*) el "unknown stage $name" ;;
esac; done
el "done"
# what comes back is at most 8 files: run.log and one archive of the rest
tar czf "$W/logs.tgz" --exclude=run.log -C "$W" logs -C "$OUT" . && mv "$W/logs.tgz" "$OUT/"
find "$OUT" -maxdepth 1 -type f ! -name run.log ! -name logs.tgz -delete
