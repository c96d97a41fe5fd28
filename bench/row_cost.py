"""What one more sequence costs llama.cpp's own decode step, without any server.

One context, and per step one llama_decode of N single-token rows in N sequences (each with a
short prompt read first), as a server's decode steps are; the median step time over --steps
steps for each N, with a KV stream per sequence (ggserve's and llama-server's default) or one
unified cache (--unified). The last column is what N - 1 streams keep of their rate when one
more joins: the ceiling of bench/isolation.py's ratio for any server on this machine. With
--spaced, the same rows in every other sequence (0, 2, 4, ...): one pass over the weights each.

    .venv/bin/python bench/row_cost.py [--model PATH] [--rows 1 4 7 8 9] [--threads 2] [--spaced]
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


def step_times(model: NativeModel, seqs: list[int], args: argparse.Namespace) -> list[float]:
    """Seconds of each of `args.steps` decodes of one single-token row in each of `seqs` (the
    context's other sequences hold only the prompt, as idle slots do)."""
    n_seq = max(seqs) + 1
    params = context_params(ContextConfig(n_ctx=N_CTX, parallel=n_seq, batch_tokens=512,
                                          threads=args.threads, rope={}))
    params.n_ctx, params.n_batch, params.n_ubatch = N_CTX * n_seq, 512, 512
    params.n_seq_max, params.kv_unified = n_seq, args.unified
    ctx = create_context(model, params, "a benchmark context")
    buffer = BatchBuffer(512, n_seq)
    try:
        prompt = model.tokenize("Once upon a time, in a lighthouse by the sea,",
                                parse_special=False)
        buffer.clear()
        for seq in range(n_seq):
            buffer.add_tokens(prompt, 0, [seq], "last")
        assert lc.llama_decode(ctx, buffer.ready()) == 0
        times = []
        for step in range(args.steps + 3):  # the first three warm up
            buffer.clear()
            buffer.add_rows([prompt[-1]] * len(seqs), [len(prompt) + step] * len(seqs), seqs)
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
    parser.add_argument("--spaced", action="store_true", help="also time the same rows in "
                        "sequences 0, 2, 4, ...: with a KV stream each, a pass over the weights "
                        "each (the gaps that --gap-fill closes)")
    args = parser.parse_args()
    init_backend()
    path = args.model or default_model_file()
    model = NativeModel(path, n_gpu_layers=0, repack=repack_enabled("auto"))
    print(f"\n{path.name} on {platform.machine()} ({os.cpu_count()} cores), {args.threads} "
          f"threads, {'one unified KV cache' if args.unified else 'a KV stream per sequence'}; "
          f"medians of {args.steps} steps\n")
    spaced = args.spaced and not args.unified
    print("| rows (sequences) | ms per step | ms per row | the others keep, beside this row |"
          + (" the same rows in every other sequence: ms per step |" if spaced else ""))
    print("|---|---|---|---|" + ("---|" if spaced else ""))
    previous = None
    for rows in sorted(set(args.rows)):
        ms = statistics.median(step_times(model, list(range(rows)), args)) * 1e3
        keep = "" if previous is None or previous[0] != rows - 1 else f"{previous[1] / ms:.2f}"
        apart = ""
        if spaced:
            every_other = list(range(0, 2 * rows, 2))
            apart = f" {statistics.median(step_times(model, every_other, args)) * 1e3:.1f} |"
        print(f"| {rows} | {ms:.1f} | {ms / rows:.2f} | {keep} |{apart}", flush=True)
        previous = (rows, ms)
    model.close()


if __name__ == "__main__":
    main()
