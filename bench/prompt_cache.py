"""The prompt cache: time to first token of a second conversation over the same document.

For each server, over --rounds rounds with a fresh document each: a first conversation over a
--doc-tokens document (cold), then 4 other conversations over other documents of the same
length (one after another, so that they pass through the slots and push the first document
out of them), then a second conversation over the first document with another question.
Every request is a streamed greedy /v1/completions of 8 tokens; the time to first token is
from sending the request to the first text.

Servers: ggserve with its prompt cache (host RAM) and without (GGSERVE_PROMPT_CACHE_MB=0), and
with --llama-server, llama-server with its own (--cache-ram, default 8 GiB) and without
(--cache-ram 0), all with --parallel slots on the same GGUF and threads:

    .venv/bin/python bench/prompt_cache.py --llama-server /work/llama-build/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import (
    Server,
    bench_registry,
    default_model_file,
    free_port,
    ggserve_command,
    llama_server_command,
    sse_chunks,
)
from server.engine.llama.native import NativeModel

WORDS = ["river", "harbour", "engine", "copper", "lantern", "orchard", "meadow", "signal",
         "archive", "ledger", "falcon", "quarry", "velvet", "summit", "tunnel", "granite",
         "compass", "beacon", "mirror", "thunder", "garden", "pillar", "canyon", "marble"]


def document(vocab: NativeModel, n_tokens: int, seed: int) -> str:
    """Text of exactly `n_tokens` tokens (as this model reads it) of seeded random words."""
    rng = random.Random(seed)
    text = f"Report {seed}. " + " ".join(rng.choice(WORDS) for _ in range(n_tokens * 2))
    tokens = vocab.tokenize(text, parse_special=False)[:n_tokens]
    return b"".join(vocab.piece(t) for t in tokens).decode(errors="ignore") + ".\n\n"


async def ttft(client: httpx.AsyncClient, url: str, prompt: str) -> tuple[float, int]:
    """Seconds to the first text of a streamed completion, and the prompt tokens it reused."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, cached = time.perf_counter(), 0.0, -1
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as resp:
        async for chunk in sse_chunks(resp):
            if not first and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens", cached)
    return (first or time.perf_counter()) - start, cached


async def measure(server: Server, docs: list[list[str]]) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {"cold": [], "second": [], "cached": []}
    async with httpx.AsyncClient() as client:
        await ttft(client, server.url, "Warm-up.")
        for first, *others in docs:
            runs["cold"].append((await ttft(client, server.url, first + "Question: what is "
                                            "the third word?"))[0])
            for k, other in enumerate(others):
                await ttft(client, server.url, other + f"Question {k}: summarise.")
            seconds, cached = await ttft(client, server.url, first + "Question: which word "
                                         "comes most often?")
            runs["second"].append(seconds)
            runs["cached"].append(cached)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF (default: the registry's default)")
    parser.add_argument("--llama-server", type=Path,
                        default=os.environ.get("LLAMA_SERVER") or None)
    parser.add_argument("--doc-tokens", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    args.model = args.model or default_model_file()
    vocab = NativeModel(args.model, n_gpu_layers=0, repack=False)
    n_ctx = args.doc_tokens + 512
    registry_file = bench_registry(args.model, n_ctx)
    servers: dict[str, tuple[list[str], dict[str, str]]] = {}
    for label, mb in (("ggserve, prompt cache", "2048"), ("ggserve, no prompt cache", "0")):
        port = free_port()
        servers[label] = (ggserve_command(port, registry_file, args.threads, args.parallel,
                                          ("--cpu-repack", "off")),
                          {"GGSERVE_PROMPT_CACHE_MB": mb})
    if args.llama_server:
        for label, ram in (("llama-server, --cache-ram 8192", "8192"),
                           ("llama-server, --cache-ram 0", "0")):
            port = free_port()
            servers[label] = (llama_server_command(
                args.llama_server, args.model, port, args.threads, args.parallel, n_ctx,
                ("--cache-ram", ram, "--no-repack")), {})  # AMX repacking crashes here
    print(f"{args.doc_tokens}-token documents, {args.parallel} slots, {args.threads} threads, "
          f"model {args.model.name}; medians of {args.rounds} rounds\n")
    print("| server | 1st conversation TTFT, ms | 2nd conversation TTFT (4 others between), ms "
          "| speed-up | prompt tokens reused |")
    print("|---|---|---|---|---|", flush=True)
    for round_set, (label, (command, env)) in enumerate(servers.items()):
        docs = [[document(vocab, args.doc_tokens, 1000 * round_set + 10 * r + k)
                 for k in range(5)] for r in range(args.rounds)]
        port = int(command[command.index("--port") + 1])
        os.environ.update(env)
        server = Server(label.split(",")[0], command, port)
        try:
            asyncio.run(server.ready())
            runs = asyncio.run(measure(server, docs))
        finally:
            server.stop()
            for key in env:
                os.environ.pop(key)
        cold, second = statistics.median(runs["cold"]), statistics.median(runs["second"])
        print(f"| {label} | {cold * 1000:.0f} | {second * 1000:.0f} | {cold / second:.1f}x | "
              f"{statistics.median(runs['cached']):.0f} |", flush=True)


if __name__ == "__main__":
    main()
