"""Host-overhead mode of bench/serve.py: ggserve vs llama-server where decode is nearly free.

A random-weight GGUF of 2 layers, n_embd 64 and a 32,000-token vocabulary (f32 weights, so no
CPU weight repacking applies) makes the model's own compute a small part of a token's time: what
is left is each server's host work per token (batch filling, sampling, detokenization, stop
scanning, wake-ups, serialization, HTTP). Both servers start once and stay up; for each of
(concurrency) x (non-streamed, streamed) and each of --repeat rounds they take turns, the
first alternating from cell to cell and round to round. Every request is a 512-token
/v1/completions (EOS suppressed with logit_bias, greedy) behind a unique prompt prefix, so no
prompt cache answers it. A cell's figure is completion tokens (from `usage`) over the wall
time from the first request sent to the last response ended; the table shows medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.servers import (
    ROOT,
    Server,
    bench_registry,
    free_port,
    ggserve_command,
    llama_server_command,
)

SERVERS = ("ggserve", "llama-server")
VOCAB_SIZE = 32_000
EOS_ID = 2  # gguf_factory's "</s>", the only end-of-generation token of its vocabulary
N_CTX = 1024  # per sequence: a ~20-token prompt and 512 generated tokens
TARGETS = {1: 0.95}  # ggserve / llama-server, from issue 13; 1.0 at every other concurrency


@dataclass(frozen=True)
class Cell:
    streams: int
    stream: bool

    @property
    def label(self) -> str:
        return "streamed" if self.stream else "non-streamed"


def write_tiny_gguf(directory: Path) -> Path:
    from tests.gguf_factory import SHAPES, write_gguf

    return write_gguf(directory / "host-tiny.gguf", "llama", shape=SHAPES["tiny"],
                      dtype="f32", seed=13, vocab_size=VOCAB_SIZE)


def eog_bias(model: Path | None) -> dict[str, float]:
    """logit_bias that keeps every end-of-generation token of `model` (None: the tiny one) out."""
    if model is None:
        return {str(EOS_ID): -100.0}
    from server.engine.llama.native import NativeModel, init_backend

    init_backend()
    vocab = NativeModel(model, n_gpu_layers=0, repack=False)
    return {str(t): -100.0 for t in range(vocab.n_vocab) if vocab.is_eog(t)}


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> int:
    """Send one completion; return its completion tokens as the server's `usage` counts them."""
    if not body["stream"]:
        resp = await client.post(f"{url}/v1/completions", json=body, timeout=600)
        resp.raise_for_status()
        return int(resp.json()["usage"]["completion_tokens"])
    chunks, tokens = 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks += 1
            # Only the usage chunk is parsed: the client shares the CPU with the servers.
            if '"completion_tokens"' in line:
                tokens = int(json.loads(line[6:])["usage"]["completion_tokens"])
    return tokens if tokens is not None else chunks


async def run_cell(server: Server, cell: Cell, args: argparse.Namespace, salt: str) -> float:
    """Aggregate completion tokens/s of `cell.streams` concurrent requests."""
    bodies = [{"model": "bench", "prompt": f"{salt}-{i}. Write a long story about the sea.",
               "max_tokens": args.max_tokens, "temperature": 0, "stream": cell.stream,
               "logit_bias": args.bias,
               **({"stream_options": {"include_usage": True}} if cell.stream else {})}
              for i in range(cell.streams)]
    limits = httpx.Limits(max_connections=cell.streams + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        began = time.perf_counter()
        counts = await asyncio.gather(*(one_request(client, server.url, b) for b in bodies))
        elapsed = time.perf_counter() - began
    expected = args.max_tokens * cell.streams
    if sum(counts) != expected:
        print(f"  warning: {server.name} generated {sum(counts)} tokens, expected {expected}")
    return sum(counts) / elapsed


async def measure(servers: dict[str, Server], cells: list[Cell],
                  args: argparse.Namespace) -> dict[tuple[str, Cell], list[float]]:
    for server in servers.values():
        await server.ready()
        for cell in cells:  # warm-up: loads the model, fills every slot once
            await run_cell(server, cell, _short(args), salt=f"warm-{server.name}")
    samples: dict[tuple[str, Cell], list[float]] = {}
    for rnd in range(args.repeat):
        for index, cell in enumerate(cells):
            order = SERVERS if (rnd + index) % 2 == 0 else SERVERS[::-1]
            for name in order:
                rate = await run_cell(servers[name], cell, args, salt=f"{rnd}-{index}-{name}")
                samples.setdefault((name, cell), []).append(rate)
                print(f"  round {rnd + 1} {name:12} {cell.streams:3} x {cell.label:12} "
                      f"{rate:8.1f} tok/s", flush=True)
    return samples


def _short(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "max_tokens": 16})


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (ggserve's own dependency): less client work per chunk."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def table(samples: dict[tuple[str, Cell], list[float]], cells: list[Cell]) -> str:
    head = ["requests", "mode", "ggserve tok/s", "llama-server tok/s", "ratio", "target",
            "host µs/token more than llama-server (1 request)", "ggserve runs", "llama-server runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        ours = statistics.median(samples["ggserve", cell])
        theirs = statistics.median(samples["llama-server", cell])
        extra = f"{1e6 / ours - 1e6 / theirs:+.0f}" if cell.streams == 1 else ""
        runs = [" / ".join(f"{r:.0f}" for r in samples[name, cell]) for name in SERVERS]
        lines.append(f"| {cell.streams} | {cell.label} | {ours:.0f} | {theirs:.0f} | "
                     f"{ours / theirs:.2f}x | ≥ {TARGETS.get(cell.streams, 1.0):.2f}x | {extra} | "
                     f"{runs[0]} | {runs[1]} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> str:
    """Run the host-overhead comparison; return the report (a line on the set-up, the table)."""
    if not args.llama_server or not Path(args.llama_server).is_file():
        raise SystemExit("--mode host needs a llama-server binary: --llama-server or "
                         f"LLAMA_SERVER (got {args.llama_server})")
    args.bias = eog_bias(args.model)
    model = args.model or write_tiny_gguf(Path(tempfile.mkdtemp()))
    slots = max(args.concurrency)
    cells = [Cell(n, stream) for n in args.concurrency for stream in (False, True)]
    ports = {name: free_port() for name in SERVERS}
    registry = bench_registry(model, N_CTX)
    servers = {
        "ggserve": Server("ggserve", ggserve_command(
            ports["ggserve"], registry, args.threads, slots, ("--cpu-repack", "off")),
            ports["ggserve"], cwd=args.ggserve_dir or ROOT),
        "llama-server": Server("llama-server", llama_server_command(
            args.llama_server, model, ports["llama-server"], args.threads, slots, N_CTX,
            ("--no-repack",)), ports["llama-server"]),
    }
    load_before = os.getloadavg()[0]
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            samples = runner.run(measure(servers, cells, args))
    finally:
        for server in servers.values():
            server.stop()
    what = ("tiny random-weight GGUF (llama, 2 layers, n_embd 64, 32,000-token vocabulary, f32)"
            if args.model is None else f"model {Path(model).name}")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{args.threads} threads; {what}; {args.max_tokens}-token /v1/completions, EOS "
               f"suppressed, greedy; both servers up throughout; median of {args.repeat} "
               f"alternating rounds; 1-minute load average {load_before:.1f} before, "
               f"{os.getloadavg()[0]:.1f} after (other work on the machine skews the figures)")
    return f"{machine}\n\n{table(samples, cells)}\n"
