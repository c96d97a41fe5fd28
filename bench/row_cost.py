"""What one more sequence costs llama.cpp's own decode step, without any server.

One context, and per step one llama_decode of N single-token rows in N sequences (each with a
short prompt read first), as a server's decode steps are; the median step time over --steps
steps for each N, with a KV stream per sequence (ggserve's and llama-server's default) or one
unified cache (--unified). The last column is what N - 1 streams keep of their rate when one
more joins: the ceiling of bench/isolation.py's ratio for any server on this machine.

    .venv/bin/python bench/row_cost.py [--model PATH] [--rows 1 4 7 8 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import llama_cpp as lc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import default_model_file
from server.engine.llama.buffer import BatchBuffer
from server.engine.llama.context import ContextConfig, context_params, create_context
from server.engine.llama.native import NativeModel, init_backend, repack_enabled

N_CTX = 512  # positions per sequence: a short prompt and the timed steps


def step_times(model: NativeModel, rows: int, args: argparse.Namespace) -> list[float]:
    """Seconds of each of `args.steps` decodes of `rows` single-token rows, one per sequence."""
    params = context_params(ContextConfig(n_ctx=N_CTX, parallel=rows, batch_tokens=512,
                                          threads=args.threads, rope={}))
    params.n_ctx, params.n_batch, params.n_ubatch = N_CTX * rows, 512, 512
    params.n_seq_max, params.kv_unified = rows, args.unified
    ctx = create_context(model, params, "a benchmark context")
    buffer = BatchBuffer(512, rows)
    try:
        prompt = model.tokenize("Once upon a time, in a lighthouse by the sea,",
                                parse_special=False)
        buffer.clear()
        for seq in range(rows):
            buffer.add_tokens(prompt, 0, [seq], "last")
        assert lc.llama_decode(ctx, buffer.ready()) == 0
        times = []
        for step in range(args.steps + 3):  # the first three warm up
            buffer.clear()
            buffer.add_rows([prompt[-1]] * rows, [len(prompt) + step] * rows,
                            list(range(rows)))
            began = time.perf_counter()
            assert lc.llama_decode(ctx, buffer.ready()) == 0
            lc.llama_synchronize(ctx)
            times.append(time.perf_counter() - began)
        return times[3:]
    finally:
        lc.llama_free(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: the default model's)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 7, 8, 9])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=140)
    parser.add_argument("--unified", action="store_true", help="one KV cache for all")
    args = parser.parse_args()
    init_backend()
    path = args.model or default_model_file()
    model = NativeModel(path, n_gpu_layers=0, repack=repack_enabled("auto"))
    print(f"\n{path.name} on {platform.machine()} ({os.cpu_count()} cores), {args.threads} "
          f"threads, {'one unified KV cache' if args.unified else 'a KV stream per sequence'}; "
          f"medians of {args.steps} steps\n")
    print("| rows (sequences) | ms per step | ms per row | the others keep, beside this row |")
    print("|---|---|---|---|")
    previous = None
    for rows in sorted(set(args.rows)):
        ms = statistics.median(step_times(model, rows, args)) * 1e3
        keep = "" if previous is None or previous[0] != rows - 1 else f"{previous[1] / ms:.2f}"
        print(f"| {rows} | {ms:.1f} | {ms / rows:.2f} | {keep} |", flush=True)
        previous = (rows, ms)
    model.close()


if __name__ == "__main__":
    main()
