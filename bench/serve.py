"""Serving benchmark: ggserve vs llama-cpp-python's server vs llama.cpp's llama-server.

Starts each server in turn on loopback with the same GGUF and thread count, then drives it with
streamed /v1/completions requests: for each concurrency level, aggregate decode tokens/s,
per-stream tokens/s and time to first token (p50/p95); and the prefill rate on a long prompt.
EOS is suppressed with logit_bias so every stream generates exactly --max-tokens tokens; each
prompt starts with a unique number so no server can answer from a prompt cache.

    .venv/bin/python bench/serve.py --llama-server /path/to/llama-server

Prints one table (ratios of ggserve to each peer) and, with --write, replaces the table
for --label (cpu by default) in docs/benchmarks.md, keeping the notes around it.

`--mode host` compares host work per token with llama-server instead, on a tiny random-weight
GGUF (bench/host.py): 512-token requests at 1 and 32 concurrent, non-streamed and streamed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.servers import (  # noqa: E402
    Server,
    bench_registry,
    default_model_file,
    free_port,
    ggserve_command,
    llama_cpp_python_command,
    llama_server_command,
    sse_chunks,
)

if TYPE_CHECKING:
    from server.engine.llama.native import NativeModel

FILLER = ("The history of navigation is a story of stars, instruments and patient record "
          "keeping across many centuries of voyages. ")


@dataclass
class Level:
    streams: int
    aggregate: float = 0.0  # decode tokens/s over the whole run
    per_stream: float = 0.0
    ttft_p50: float = 0.0
    ttft_p95: float = 0.0
    tokens: int = 0


@dataclass
class Result:
    server: str
    levels: dict[int, Level] = field(default_factory=dict)
    prefill: float = 0.0


def server_command(name: str, args: argparse.Namespace, port: int, n_ctx: int,
                   registry: Path) -> list[str]:
    slots = max(args.concurrency)
    if name == "ggserve":
        return ggserve_command(port, registry, args.threads, slots)
    if name == "llama-cpp-python":
        return llama_cpp_python_command(args.model, port, args.threads, n_ctx)
    return llama_server_command(args.llama_server, args.model, port, args.threads, slots, n_ctx)


async def one_stream(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> \
        tuple[float, float, float, int]:
    """(start, first token, last token) times and the number of text chunks received."""
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 timeout=600) as resp:
            async for chunk in sse_chunks(resp):
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
                    count += 1
    except httpx.RemoteProtocolError:
        pass  # llama-cpp-python's server cuts a running stream when a new request arrives
    return start, first or time.perf_counter(), last or time.perf_counter(), count


def body(model: str, prompt: str, max_tokens: int, bias: dict[str, float]) -> dict[str, object]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "logit_bias": bias}


async def run_level(url: str, model: str, streams: int, args: argparse.Namespace,
                    bias: dict[str, float], salt: int) -> Level:
    prompts = [f"{salt}-{i}. Write a long story about a lighthouse keeper." for i in
               range(streams)]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 4)) as client:
        began = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, body(
            model, p, args.max_tokens, bias)) for p in prompts))
        ended = max(r[2] for r in results)
    ttfts = sorted(r[1] - r[0] for r in results)
    per_stream = [(r[3] - 1) / (r[2] - r[1]) for r in results if r[3] > 1 and r[2] > r[1]]
    tokens = sum(r[3] for r in results)
    return Level(streams, tokens / (ended - began), statistics.mean(per_stream or [0.0]),
                 statistics.median(ttfts), ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
                 tokens)


async def run_prefill(url: str, model: str, args: argparse.Namespace, vocab: NativeModel,
                      salt: int) -> float:
    text = f"{salt}. " + FILLER * (args.prefill_tokens // 20 + 1)
    tokens = vocab.tokenize(text, parse_special=False)[:args.prefill_tokens]
    prompt = b"".join(vocab.piece(t) for t in tokens).decode(errors="ignore")
    n_prompt = len(vocab.tokenize(prompt, parse_special=True))
    async with httpx.AsyncClient() as client:
        start, first, _, _ = await one_stream(client, url, body(model, prompt, 1, {}))
    return n_prompt / (first - start)


async def bench_server(name: str, args: argparse.Namespace, vocab: NativeModel,
                       bias: dict[str, float], registry: Path) -> Result:
    port = free_port()
    server = Server(name, server_command(name, args, port, args.prefill_tokens + 512, registry),
                    port)
    url = server.url
    result = Result(name)
    try:
        await server.ready()
        model = "bench"
        await run_level(url, model, 1, args, bias, salt=0)  # warm-up
        for streams in args.concurrency:
            level = await run_level(url, model, streams, args, bias, salt=streams * 1000)
            result.levels[streams] = level
            print(f"  {name:18} {streams:3} streams: {level.aggregate:7.1f} tok/s aggregate, "
                  f"{level.per_stream:6.1f} per stream, TTFT p50 {level.ttft_p50:.3f}s "
                  f"p95 {level.ttft_p95:.3f}s", flush=True)
        result.prefill = await run_prefill(url, model, args, vocab, salt=7)
        print(f"  {name:18} prefill {result.prefill:.1f} tok/s", flush=True)
    finally:
        server.stop()
    return result


def median_result(runs: list[Result]) -> Result:
    """Per level, the run with the median aggregate; prefill likewise."""
    merged = Result(runs[0].server, prefill=statistics.median(r.prefill for r in runs))
    for streams in runs[0].levels:
        levels = sorted((r.levels[streams] for r in runs), key=lambda lv: lv.aggregate)
        merged.levels[streams] = levels[len(levels) // 2]
    return merged


def table(results: list[Result], args: argparse.Namespace) -> str:
    ours = results[0]
    peers = results[1:]
    head = ["streams", *(f"{r.server} tok/s" for r in results),
            *(f"ratio vs {p.server}" for p in peers), "per-stream tok/s (ours)",
            "TTFT p50/p95 s (ours)", *(f"TTFT p50/p95 s ({p.server})" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for streams in args.concurrency:
        mine = ours.levels[streams]
        row = [str(streams), *(f"{r.levels[streams].aggregate:.1f}" for r in results),
               *(f"{mine.aggregate / p.levels[streams].aggregate:.2f}x" for p in peers),
               f"{mine.per_stream:.1f}", f"{mine.ttft_p50:.2f} / {mine.ttft_p95:.2f}",
               *(f"{p.levels[streams].ttft_p50:.2f} / {p.levels[streams].ttft_p95:.2f}"
                 for p in peers)]
        lines.append("| " + " | ".join(row) + " |")
    row = [f"prefill, {args.prefill_tokens}-token prompt",
           *(f"{r.prefill:.1f}" for r in results),
           *(f"{ours.prefill / p.prefill:.2f}x" for p in peers), "", "",
           *("" for _ in peers)]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# Defaults per mode: (threads, concurrency, max tokens, repeat).
MODE_DEFAULTS = {"serve": (os.cpu_count() or 1, [1, 4, 8, 16, 32], 64, 1),
                 "host": (2, [1, 32], 512, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=list(MODE_DEFAULTS), default="serve",
                        help="serve: the serving table (default); host: host work per token "
                             "against llama-server on a tiny GGUF (bench/host.py)")
    parser.add_argument("--model", type=Path,
                        help="GGUF (default: the registry's default; host mode: a tiny one)")
    parser.add_argument("--llama-server", type=Path, default=os.environ.get("LLAMA_SERVER") or None,
                        help="llama-server binary built from the vendored llama.cpp")
    parser.add_argument("--threads", type=int, help="default: all cores; host mode: 2")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        help="default: 1,4,8,16,32; host mode: 1,32")
    parser.add_argument("--max-tokens", type=int, help="default: 64; host mode: 512")
    parser.add_argument("--prefill-tokens", type=int, default=2000)
    parser.add_argument("--ggserve-dir", type=Path,
                        help="host mode: run ggserve from this checkout (`git archive` of "
                             "another commit) instead of this one, with this venv")
    parser.add_argument("--servers", default="ggserve,llama-server,llama-cpp-python")
    parser.add_argument("--repeat", type=int,
                        help="runs per server, in alternating order; the table shows medians "
                             "(default: 1; host mode: 3)")
    parser.add_argument("--write", action="store_true",
                        help="replace the table for --label in docs/benchmarks.md")
    parser.add_argument("--label", default="cpu",
                        help="which table --write replaces (cpu, gpu; host-<label> in host mode)")
    args = parser.parse_args()
    # A `timeout` or kill must still stop the servers this started (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for key, default in zip(("threads", "concurrency", "max_tokens", "repeat"),
                            MODE_DEFAULTS[args.mode], strict=True):
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.mode == "host":
        from bench import host

        report, label = host.main(args), f"host-{args.label}"
    else:
        report, label = serving_report(args, parser), args.label
    print()
    print(report)
    if args.write:
        write_report(label, f"Latest run ({time.strftime('%Y-%m-%d')}): {report}")


def serving_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """Run the serving comparison; return the report (a line on the set-up, the table)."""
    args.model = args.model or default_model_file()
    names = args.servers.split(",")
    if "llama-server" in names and not args.llama_server:
        parser.error("--llama-server (or LLAMA_SERVER) is needed to run llama-server")
    from server.engine.llama.native import NativeModel, init_backend

    init_backend()
    vocab = NativeModel(args.model, n_gpu_layers=0, repack=False)
    eog = [t for t in range(vocab.n_vocab) if vocab.is_eog(t)]
    bias = {str(t): -100.0 for t in eog}
    registry = bench_registry(args.model, args.prefill_tokens + 512)
    runs: dict[str, list[Result]] = {name: [] for name in names}
    for rep in range(args.repeat):
        for name in names if rep % 2 == 0 else names[::-1]:
            runs[name].append(asyncio.run(bench_server(name, args, vocab, bias, registry)))
    results = [median_result(runs[name]) for name in names]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{args.threads} threads; model {args.model.name}; {args.max_tokens} output tokens "
               f"per stream, EOS suppressed; median of {args.repeat} run(s) per server")
    return f"{machine}\n\n{table(results, args)}\n"


def write_report(label: str, report: str) -> None:
    """Replace this label's table in docs/benchmarks.md, keeping everything else written there."""
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- bench:{label} -->", f"<!-- /bench:{label} -->"
    block = f"{start}\n{report.strip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {label}\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
