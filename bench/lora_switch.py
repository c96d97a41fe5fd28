"""What switching LoRA adapters costs a llama.cpp context (README "LoRA adapters").

Writes a random rank-8 adapter on every attn_q and attn_v of a GGUF (default: SmolLM2, the
default model), then times llama_decode of one row for each of 4 sequences, steps after steps:
with no adapter, with the adapter on throughout, switching at every step, and switching every
4th step (the scheduler's turns). A switch makes llama.cpp re-reserve the context's compute
graphs before the next decode; the median decode time after a switch, against the others,
is its cost:

    .venv/bin/python bench/lora_switch.py [--model path.gguf] [--steps 80]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import llama_cpp as lc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import default_model_file
from server.engine.llama.buffer import BatchBuffer
from server.engine.llama.native import NativeModel, init_backend, repack_enabled
from server.settings import Settings
from tests.gguf_factory import write_lora

SEQS = 4


def random_adapter(model: Path, target: Path) -> Path:
    reader = gguf.GGUFReader(str(model))
    rng = np.random.default_rng(0)
    weights = {t.name: (rng.standard_normal((8, int(t.shape[0]))) * 0.01,
                        rng.standard_normal((int(t.shape[1]), 8)) * 0.01)
               for t in reader.tensors if t.name.endswith(("attn_q.weight", "attn_v.weight"))}
    arch = str(reader.fields["general.architecture"].contents())
    return write_lora(target, arch, weights, alpha=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: the default model)")
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    settings = Settings()
    path = args.model or default_model_file()
    init_backend()
    with tempfile.TemporaryDirectory() as tmp:
        adapter_file = random_adapter(path, Path(tmp) / "adapter.gguf")
        model = NativeModel(path, n_gpu_layers=0, repack=repack_enabled("auto"))
        adapter = lc.llama_adapter_lora_init(model.ptr, str(adapter_file).encode())
    params = lc.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 4096, 512, 512, SEQS
    params.n_threads = params.n_threads_batch = settings.threads
    ctx = lc.llama_init_from_model(model.ptr, params)
    handles = (lc.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(1.0)

    def use(on: bool) -> None:
        if on:
            lc.llama_set_adapters_lora(ctx, handles, 1, scales)
        else:
            lc.llama_set_adapters_lora(ctx, None, 0, None)

    for label, pattern in (("no adapter", lambda k: False), ("adapter on", lambda k: True),
                           ("switch every step", lambda k: k % 2 == 1),
                           ("switch every 4th", lambda k: (k // 4) % 2 == 1)):
        after, other = run(ctx, use, pattern, args.steps)
        print(f"{path.name}: {label:18s} median decode {statistics.median(after + other):6.2f} "
              f"ms; after a switch {median(after)}, otherwise {median(other)}")
    lc.llama_free(ctx)
    lc.llama_adapter_lora_free(adapter)
    model.close()


def median(times: list[float]) -> str:
    return f"{statistics.median(times):6.2f} ms" if times else "     -   "


def run(ctx: Any, use: Callable[[bool], None], pattern: Callable[[int], bool],
        steps: int) -> tuple[list[float], list[float]]:
    """Decode times (ms) of the steps right after a switch, and of the others."""
    memory = lc.llama_get_memory(ctx)
    buffer = BatchBuffer(512, SEQS)
    for seq in range(SEQS):
        lc.llama_memory_seq_rm(memory, seq, 0, -1)
    use(False)
    buffer.clear()
    buffer.add_tokens([1] * 8, 0, [0], "last")
    lc.llama_decode(ctx, buffer.ready())
    for seq in range(1, SEQS):
        lc.llama_memory_seq_cp(memory, 0, seq, -1, -1)
    after: list[float] = []
    other: list[float] = []
    for k in range(steps):
        use(pattern(k))
        buffer.clear()
        buffer.add_rows([5 + k] * SEQS, [8 + k] * SEQS, list(range(SEQS)))
        began = time.perf_counter()
        if lc.llama_decode(ctx, buffer.ready()) != 0:
            raise RuntimeError("llama_decode failed")
        lc.llama_synchronize(ctx)
        if k >= 4:  # past the first graphs
            (after if pattern(k) != pattern(k - 1) else other).append(
                (time.perf_counter() - began) * 1e3)
    return after, other


if __name__ == "__main__":
    main()
