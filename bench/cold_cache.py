"""How much slower the server's per-step Python runs right after a llama_decode on the CPU.

A decode on the CPU streams the model's weights through the caches and evicts the
interpreter's working set (code, dicts, the samplers' objects); the logits row was just written
by llama.cpp's threads on other cores. So the Python that follows each decode runs from memory,
several times slower than the same call in a hot loop, which is where microbenchmarks time it.
This times a trivial Python call and three calls the scheduler makes every step, both ways, on
one sequence: the logits row's numpy view, a greedy sample with a logit bias (host mode's
requests), and a native sampler chain (temperature 0.7, top-k 40, top-p 0.9). Default model:
host mode's tiny GGUF.

    .venv/bin/python bench/cold_cache.py [--model PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host import EOS_ID, write_tiny_gguf
from server.engine.base import SamplingParams
from server.engine.llama.native import NativeModel, init_backend
from server.engine.llama.sampling import SequenceSampler, logits_row
from tests.engine.test_sampling import Context

HOT_CALLS = 2000
COLD_STEPS = 100  # decodes per call; four calls fit the test context's 512 positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: host mode's tiny one)")
    args = parser.parse_args()
    init_backend()
    path = args.model or write_tiny_gguf(Path(tempfile.mkdtemp()))
    model = NativeModel(path, n_gpu_layers=0, repack=False)
    ctx = Context(model)  # 2 threads
    greedy = SequenceSampler(SamplingParams(temperature=0, logit_bias={EOS_ID: -100.0}),
                             model.n_vocab, 1)
    chain = SequenceSampler(SamplingParams(temperature=0.7, top_k=40, top_p=0.9),
                            model.n_vocab, 1)
    table = {"a": 1}
    calls: dict[str, Callable[[int], object]] = {
        "a Python function call (a dict lookup)": lambda row: table["a"] + row,
        "the logits row's numpy view": lambda row: logits_row(ctx.ctx, row, model.n_vocab),
        "greedy sample with a logit bias": lambda row: greedy.try_sample(ctx.ctx, row),
        "native chain sample (top-k 40, top-p, temperature)":
            lambda row: chain.try_sample(ctx.ctx, row),
    }
    prompt = model.tokenize("Once upon a time", parse_special=False)
    ctx.buffer.clear()
    ctx.buffer.add_tokens(prompt, 0, [0], "last")
    ctx.decode()
    pos, row = len(prompt), ctx.buffer.n - 1
    decode_time = 0.0
    print(f"\n{path.name}, 2 threads; µs per call, medians of "
          f"{HOT_CALLS} hot calls and of {COLD_STEPS} calls each right after a decode\n")
    print("| call | in a hot loop | right after llama_decode | ratio |")
    print("|---|---|---|---|")
    for name, call in calls.items():
        hot = []
        for _ in range(HOT_CALLS):
            began = time.perf_counter()
            call(row)
            hot.append(time.perf_counter() - began)
        cold = []
        for _ in range(COLD_STEPS):
            began = time.perf_counter()
            call(row)
            cold.append(time.perf_counter() - began)
            token = greedy.sample(ctx.ctx, row)
            ctx.buffer.clear()
            row = ctx.buffer.add_rows([token], [pos], [0])
            pos += 1
            began = time.perf_counter()
            ctx.decode()
            decode_time += time.perf_counter() - began
        print(f"| {name} | {median(hot):.1f} | {median(cold):.1f} | "
              f"{median(cold) / median(hot):.1f}x |")
    print(f"\n(llama_decode of one row: {decode_time / (len(calls) * COLD_STEPS) * 1e6:.0f} µs)")


def median(seconds: list[float]) -> float:
    return sorted(seconds)[len(seconds) // 2] * 1e6


if __name__ == "__main__":
    main()
