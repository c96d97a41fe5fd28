"""Gaps between running sequences: what filler rows (--gap-fill) save.

With a KV stream per sequence, llama.cpp decodes only consecutive sequence ids in one pass over
the weights. Here three streamed completions start one after the other on sequences 0, 1 and 2
(--parallel 3); the middle one ends after 48 tokens, and the other two run on with sequence
1 idle between them: two passes a step, or one with a filler row in 1. For each server, over
--rounds alternating rounds: the two long streams' aggregate tokens/s and the share of steps
llama.cpp split (ggserve:step_split_total). The default model is host mode's tiny GGUF, whose
pass costs more than a row, as on a GPU; --model another (on the CPU a real model's row costs
about as much as a pass, which is why `auto` fills only where every layer is on a GPU).
With --llama-server, llama.cpp's server runs the same requests with -np 3, and with -np 3 -kvu
(one unified KV cache: no gaps, its default when -np is not given).

    .venv/bin/python bench/gaps.py [--model PATH] [--llama-server PATH] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host import eog_bias, write_tiny_gguf
from bench.servers import Server, bench_registry, free_port, ggserve_command, sse_chunks

N_CTX = 1024


async def stream(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                 started: asyncio.Event) -> tuple[int, float]:
    """(completion tokens, when the stream ended) of one streamed completion; `started` is
    set at its first token."""
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        async for chunk in sse_chunks(resp):
            started.set()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, time.perf_counter()


async def one_round(url: str, args: argparse.Namespace, salt: str) -> float:
    """The aggregate tokens/s of the two long streams, with the short one between them."""
    lengths = (args.max_tokens, 48, args.max_tokens)  # the short one outlasts the next start
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=8)) as client:
        began = time.perf_counter()
        tasks = []
        for i, n in enumerate(lengths):  # one after the other: sequences 0, 1, 2
            started = asyncio.Event()
            body = {"model": "bench", "prompt": f"{salt}-{i} Write a long story about the sea.",
                    "max_tokens": n, "temperature": 0, "stream": True, "logit_bias": args.bias,
                    "stream_options": {"include_usage": True}}
            tasks.append(asyncio.ensure_future(stream(client, url, body, started)))
            await started.wait()
        results = await asyncio.gather(*tasks)
    (first, end_first), _, (last, end_last) = results
    return (first + last) / (max(end_first, end_last) - began)


async def split_share(url: str) -> tuple[float, float]:
    """(steps, split steps) so far, from ggserve's metrics (NaN for another server)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics", timeout=30)).text
    if "ggserve:decode_calls_total{" not in text:
        return float("nan"), float("nan")
    steps, split = (sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith(name + "{"))
                    for name in ("ggserve:decode_calls_total", "ggserve:step_split_total"))
    return steps, split


def servers(model: Path, args: argparse.Namespace) -> dict[str, Server]:
    registry = bench_registry(model, N_CTX)
    made = {}
    for fill in ("on", "off"):
        port = free_port()
        made[f"ggserve --gap-fill {fill}"] = Server(f"ggserve-gaps-{fill}", ggserve_command(
            port, registry, args.threads, 3, ("--gap-fill", fill, "--cpu-repack", "off")), port)
    if args.llama_server:
        for name, extra in (("llama-server -np 3", ()), ("llama-server -np 3 -kvu", ("-kvu",))):
            port = free_port()
            made[name] = Server(name.replace(" ", ""), [
                str(args.llama_server), "-m", str(model), "--port", str(port), "-t",
                str(args.threads), "-tb", str(args.threads), "-np", "3", "-c", str(3 * N_CTX),
                "-ngl", "999", "--alias", "bench", "--no-webui", "--no-repack", *extra], port)
    return made


async def measure(running: dict[str, Server], args: argparse.Namespace) -> \
        dict[str, tuple[list[float], float]]:
    for server in running.values():
        await server.ready()
        await one_round(server.url, argparse.Namespace(**{**vars(args), "max_tokens": 16}),
                        f"warm-{server.name}")
    before = {name: await split_share(s.url) for name, s in running.items()}
    rates: dict[str, list[float]] = {name: [] for name in running}
    names = list(running)
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            rates[name].append(await one_round(running[name].url, args, f"{rnd}-{name}"))
            print(f"  round {rnd + 1} {name:26} {rates[name][-1]:8.1f} tok/s", flush=True)
    out = {}
    for name, server in running.items():
        steps, split = await split_share(server.url)
        out[name] = (rates[name], (split - before[name][1]) / max(steps - before[name][0], 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: host mode's tiny one)")
    parser.add_argument("--llama-server", type=Path,
                        default=os.environ.get("LLAMA_SERVER") or None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.bias = eog_bias(args.model)
    model = args.model or write_tiny_gguf(Path(tempfile.mkdtemp()))
    running = servers(model, args)
    try:
        results = asyncio.run(measure(running, args))
    finally:
        for server in running.values():
            server.stop()
    print(f"\n{model.name} on {platform.machine()} ({os.cpu_count()} cores), {args.threads} "
          f"threads; two {args.max_tokens}-token greedy streams on sequences 0 and 2, sequence "
          f"1 idle between them; medians of {args.rounds} rounds\n")
    print("| server | the two streams, tok/s | steps split into two passes | rounds |")
    print("|---|---|---|---|")
    for name, (rates, split) in results.items():
        share = "" if split != split else f"{split:.0%}"  # NaN: not ggserve
        print(f"| {name} | {statistics.median(rates):.1f} | {share} | "
              f"{' / '.join(f'{r:.0f}' for r in rates)} |")


if __name__ == "__main__":
    main()
