"""Where a scheduler step's host time goes: µs per step and per sequence, by part.

Runs the real Scheduler in-process (no HTTP) on the tiny random-weight GGUF of the host mode
(bench/host.py: 2 layers, 32,000-token vocabulary, decode nearly free) with N concurrent
512-token greedy requests, timing each part of every step; then, with --http, serves one
streamed request through the whole app under cProfile and reports the event loop's µs per
token by part (chunk building and serialization, stream plumbing, the socket write).

    .venv/bin/python bench/step_profile.py [--sequences 1 32] [--http]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host import write_tiny_gguf
from server.chat.template import plain_prompt
from server.engine.base import GenerationRequest, SamplingParams
from server.engine.llama import scheduler as scheduler_module
from server.engine.llama.context import ContextConfig
from server.engine.llama.native import NativeModel, init_backend
from server.engine.llama.rows import BatchRows
from server.engine.llama.sampling import SequenceSampler
from server.metrics import Metrics

EOS = 2  # the tiny vocabulary's </s>
PARTS = {  # what each timed call is, in the order of a step
    "_receive": "inbox", "_drop_cancelled": "cancellations", "_admit": "admission",
    "fill": "planning and batch filling", "llama_decode": "llama_decode (the model)",
    "commit": "KV commit", "try_sample": "sampling", "_advance": "detokenize, stop strings, events",
    "_deliver": "hand-off to the event loop", "stepped": "step metrics", "_report": "gauges",
}


def timed(totals: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            totals[name] += time.perf_counter() - start
    return wrapper


def profile_steps(model: Path, sequences: int, args: argparse.Namespace) -> \
        tuple[dict[str, float], int]:
    """Seconds per part over a run of `sequences` requests, and the number of steps."""
    totals: dict[str, float] = defaultdict(float)
    cls = scheduler_module.Scheduler
    # (class, method) pairs, timed under the method's name; try_sample is what every sample
    # goes through (sample() calls it too)
    originals = {(owner, name): getattr(owner, name) for owner, names in (
        (cls, ("_receive", "_drop_cancelled", "_admit", "_advance", "_deliver", "_report")),
        (BatchRows, ("fill", "commit")), (SequenceSampler, ("try_sample",)))
        for name in names}
    decode = scheduler_module.lc.llama_decode
    for (owner, name), fn in originals.items():
        setattr(owner, name, timed(totals, name, fn))
    def decode_and_wait(ctx: Any, batch: Any) -> int:
        # On a GPU llama_decode returns before the graph has run: wait here, so that the
        # model's time is counted as the model's, not as the first logits read's (sampling).
        rc = decode(ctx, batch)
        scheduler_module.lc.llama_synchronize(ctx)
        return rc

    scheduler_module.lc.llama_decode = timed(totals, "llama_decode", decode_and_wait)
    try:
        init_backend()
        native = NativeModel(model, n_gpu_layers=args.gpu_layers, repack=False)
        n_ctx = args.max_tokens + 512
        config = ContextConfig(n_ctx=n_ctx, parallel=sequences, batch_tokens=512,
                               threads=args.threads, rope={}, kv_cells=n_ctx * sequences,
                               backend_sampling=args.backend_sampling)
        scheduler = scheduler_module.Scheduler(native, config, "bench", Metrics())
        metrics = scheduler._metrics
        metrics.stepped = timed(totals, "stepped", metrics.stepped)  # type: ignore[method-assign]

        async def run() -> None:
            async def one(i: int) -> None:
                request = GenerationRequest(
                    "bench", plain_prompt(f"{i} {time.time()} Once upon a time"),
                    SamplingParams(temperature=0, logit_bias={EOS: -100.0}),
                    max_tokens=args.max_tokens,
                    stream=True)
                async for _ in await scheduler.submit(request):
                    pass
            await asyncio.gather(*(one(i) for i in range(sequences)))

        asyncio.run(run())  # warm-up
        totals.clear()
        steps_before = metrics._decode_calls._value.get()
        asyncio.run(run())
        steps = int(metrics._decode_calls._value.get() - steps_before)
        scheduler.close()
        native.close()
    finally:
        for (owner, name), fn in originals.items():
            setattr(owner, name, fn)
        scheduler_module.lc.llama_decode = decode
    return dict(totals), steps


def print_steps(model: Path, counts: list[int], args: argparse.Namespace) -> None:
    results = {n: profile_steps(model, n, args) for n in counts}
    head = " | ".join(f"{n} seq: µs/step | µs/seq/step" for n in counts)
    print(f"\n| part | {head} |")
    print("|---|" + "---|---|" * len(counts))
    for key, label in [*PARTS.items(), ("total", "step total")]:
        cells = []
        for n, (totals, steps) in results.items():
            seconds = sum(totals.values()) if key == "total" else totals.get(key, 0.0)
            cells.append(f"{seconds / steps * 1e6:.1f} | {seconds / steps / n * 1e6:.1f}")
        print(f"| {label} | {' | '.join(cells)} |")
    for n, (totals, steps) in results.items():
        host = sum(v for k, v in totals.items() if k != "llama_decode")
        print(f"\n{n} sequences: {steps} steps; host work {host / steps * 1e6:.0f} µs/step "
              f"({host / steps / n * 1e6:.1f} µs per sequence), llama_decode "
              f"{totals['llama_decode'] / steps * 1e6:.0f} µs/step")


LOOP_PARTS = {
    "the socket write (uvicorn, httptools)": ("httptools_impl.py", "send"),
    "chunk building and JSON (pydantic)": ("pydantic", ""),
    "SSE framing and send wrappers": ("server/api/sse.py", ""),
    "stream plumbing (queues, generators, metering)": ("", ""),
}


def print_loop(model: Path, tokens: int = 2000) -> None:
    """One streamed request through the app in this process, its event loop under cProfile."""
    import uvicorn

    from bench.servers import free_port
    from server.app import create_app
    from server.settings import Settings

    registry = Path(tempfile.mkdtemp()) / "models.yaml"
    registry.write_text(f"models:\n  bench:\n    path: {model}\n    n_ctx: {tokens + 64}\n"
                        "    sampling: {repeat_penalty: 1.0}\n")
    port = free_port()
    app = create_app(Settings(models_file=registry, parallel=1, threads=2, cpu_repack="off"))
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning",
                                           loop="uvloop", http="httptools"))
    body = ('{"model": "bench", "prompt": "Hello", "stream": true, "temperature": 0, '
            f'"max_tokens": {tokens}, "logit_bias": {{"{EOS}": -100}}}}')

    def client() -> None:
        time.sleep(3)
        for _ in range(2):
            subprocess.run(["curl", "-sN", f"http://127.0.0.1:{port}/v1/completions", "-H",
                            "content-type: application/json", "-d", body], check=True,
                           capture_output=True)
        server.should_exit = True

    profiler = cProfile.Profile()
    threading.Thread(target=client).start()
    profiler.enable()
    server.run()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    per_token = {label: 0.0 for label in LOOP_PARTS}
    for (file, _, function), (_, _, own, _, _) in stats.items():
        if "asyncio" in file and function in ("run", "run_forever", "_run_once"):
            continue  # idle time inside the loop's C code
        if function == "app" and "fastapi/routing" in file:
            continue
        for label, (where, name) in LOOP_PARTS.items():
            if where in file and (not name or name == function):
                per_token[label] += own
                break
    print(f"\nevent loop, one streamed request (µs per token, {2 * tokens} tokens):")
    for label, seconds in per_token.items():
        print(f"  {label:48s} {seconds / (2 * tokens) * 1e6:6.1f}")
    print(f"  {'all of it':48s} {sum(per_token.values()) / (2 * tokens) * 1e6:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--http", action="store_true", help="also profile the event loop")
    parser.add_argument("--model", type=Path,
                        help="a GGUF whose end-of-sequence token is id 2 (default: the tiny one)")
    parser.add_argument("--gpu-layers", type=int, default=0, help="-1: every layer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--backend-sampling", action="store_true",
                        help="sampler chains in the decode graph (the server's default on a GPU)")
    args = parser.parse_args()
    model = args.model or write_tiny_gguf(Path(tempfile.mkdtemp()))
    print_steps(model, args.sequences, args)
    if args.http:
        print_loop(model)


if __name__ == "__main__":
    main()
