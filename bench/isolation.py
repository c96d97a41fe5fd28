"""Grammar isolation: does one constrained request slow the others down?

Starts ggserve with the default model (with --baseline, a second checkout's ggserve, e.g. the
commit before a change; with --llama-server, llama.cpp's server on the same GGUF) and, for each
server in turn, over --rounds alternating rounds:

- 8 plain streamed chat completions alone (aggregate tokens/s),
- the same 8 with a ninth, plain stream beside them (the cost of one more sequence alone),
- the same 8 with one `response_format: json_schema` stream beside them: their aggregate, and
  the constrained stream's own tokens/s.

Prints medians and the ratio (with / without) that issue 13 asks to keep at >= 0.90:

    .venv/bin/python bench/isolation.py [--baseline /path/to/other/checkout]
        [--llama-server /work/llama-build/bin/llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import math
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

from bench.servers import ROOT, Server, default_model_file, free_port, sse_chunks

MODEL = "smollm2-135m-instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                      "street": {"type": "string"}},
                    "required": ["city", "street"]},
    },
    "required": ["name", "age", "hobbies", "address"],
}


async def stream(client: httpx.AsyncClient, url: str,
                 body: dict[str, Any]) -> tuple[int, float, float]:
    """(tokens, seconds from the first token to the last, when it ended) of one streamed chat
    completion."""
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             timeout=600) as resp:
        async for chunk in sse_chunks(resp):
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return tokens, last - first, time.perf_counter()


def plain(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
            "stream": True, "stream_options": {"include_usage": True},
            "logit_bias": {"0": -100, "1": -100, "2": -100},  # no end: every stream runs full
            "messages": [{"role": "user", "content": f"{time.time()} Story {i}: a long tale "
                                                     "of a lighthouse keeper."}]}


def constrained(max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0.7, "stream": True,
            "stream_options": {"include_usage": True},
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "person", "schema": SCHEMA}},
            "messages": [{"role": "user", "content": f"{time.time()} Describe a person."}]}


async def one_round(url: str, max_tokens: int, ninth: str | None) -> tuple[float, float]:
    """(aggregate tokens/s of the 8 plain streams, the ninth stream's own tokens/s); `ninth`
    is None, "plain" or "json_schema"."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=16)) as client:
        began = time.perf_counter()
        jobs = [stream(client, url, plain(i, max_tokens)) for i in range(8)]
        if ninth is not None:
            jobs.append(stream(client, url, constrained(max_tokens) if ninth == "json_schema"
                               else plain(8, max_tokens)))
        results = await asyncio.gather(*jobs)
    # Over the eight's own time: a ninth stream that ends later must not stretch it.
    ended = max(end for _, _, end in results[:8])
    aggregate = sum(t for t, _, _ in results[:8]) / (ended - began)
    own = results[8][0] / results[8][1] if ninth is not None and results[8][1] > 0 else 0.0
    return aggregate, own


def registry(model: Path, template: str | None) -> Path:
    """A models.yaml serving `model` under the default model's id and settings (on a GPU
    machine, where the default model's package is not installed: bench/cut_model.py)."""
    path = Path(tempfile.mkdtemp()) / "models.yaml"
    path.write_text(f"models:\n  {MODEL}:\n    path: {model.resolve()}\n"
                    "    stop: [\"<|im_end|>\"]\n    n_ctx: 8192\n    n_gpu_layers: -1\n"
                    "    sampling: {temperature: 0.2, top_p: 0.9}\n"
                    + (f"    template: {template}\n" if template else ""))
    return path


def ggserve(name: str, root: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    models = ["--models-file", str(registry(args.model, args.template))] if args.model else []
    return Server(name, [sys.executable, "-m", "server", "--port", str(port), "--parallel",
                         "9", "--log-level", "warning", *models, *args.server_args.split()],
                  port, cwd=root)


def llama_server(args: argparse.Namespace) -> Server:
    """llama.cpp's server on the same GGUF: 9 slots, every layer on the GPU where there is one,
    its own sampling defaults beyond what the requests set, the GGUF's template (--jinja)."""
    port = free_port()
    model = args.model or default_model_file()
    template = ["--chat-template-file", str(ROOT / "templates" / f"{args.template}.jinja")] \
        if args.template else []
    return Server("llama-server", [
        str(args.llama_server), "-m", str(model), "--port", str(port), "-np", "9",
        "-c", str(9 * 2048), "-ngl", "999", "--alias", MODEL, "--jinja", "--no-webui",
        "--metrics", *template, *args.llama_server_args.split()], port)


async def measure(server: Server, args: argparse.Namespace) -> dict[str, float]:
    try:
        await server.ready()
        await one_round(server.url, 16, "json_schema")  # warm-up
        rejections = await grammar_rejections(server.url)
        runs: dict[str, list[float]] = {k: [] for k in ("alone", "plain", "plain_own",
                                                         "beside", "own")}
        for _ in range(args.rounds):
            runs["alone"].append((await one_round(server.url, args.max_tokens, None))[0])
            aggregate, own = await one_round(server.url, args.max_tokens, "plain")
            runs["plain"].append(aggregate)
            runs["plain_own"].append(own)
            aggregate, own = await one_round(server.url, args.max_tokens, "json_schema")
            runs["beside"].append(aggregate)
            runs["own"].append(own)
        rejections = await grammar_rejections(server.url) - rejections
    finally:
        server.stop()
    medians = {k: statistics.median(v) for k, v in runs.items()}
    medians["rejections"] = rejections / args.rounds
    return medians


async def grammar_rejections(url: str) -> float:
    """ggserve:grammar_rejections_total, summed over models (NaN where a server has none)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics", timeout=30)).text
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ggserve:grammar_rejections_total")]
    return sum(counts) if counts else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", type=Path, help="serve this GGUF as the default model "
                        "(e.g. bench/cut_model.py's cut of it on a GPU machine)")
    parser.add_argument("--template", help="with --model: a template of templates/ for a "
                        "GGUF without one (e.g. chatml for tests.gguf_factory's models)")
    parser.add_argument("--server-args", default="", help="more flags for ggserve (both "
                        "checkouts'), e.g. '--threads 1'")
    parser.add_argument("--llama-server", type=Path,
                        default=os.environ.get("LLAMA_SERVER") or None,
                        help="a llama-server binary to measure the same way")
    parser.add_argument("--llama-server-args", default="", help="more flags for llama-server, "
                        "e.g. '-t 2 --no-repack' (AMX repacking crashes on some CPUs)")
    args = parser.parse_args()
    rows = {"ggserve": asyncio.run(measure(ggserve("ggserve", ROOT, args), args))}
    if args.baseline:
        rows["baseline"] = asyncio.run(measure(ggserve("baseline", args.baseline, args), args))
    if args.llama_server:
        rows["llama-server"] = asyncio.run(measure(llama_server(args), args))
    what = args.model.name if args.model else MODEL
    print(f"\n{platform.machine()}, {os.cpu_count()} cores; 8 plain chat streams of {what}, "
          f"{args.max_tokens} tokens each, medians of {args.rounds} rounds\n")
    print("| server | 8 plain alone | + a 9th plain stream | ratio | + a json_schema stream "
          "| ratio | the 9th plain stream itself | the json_schema stream itself "
          "| grammar refusals per round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        refusals = "" if math.isnan(r["rejections"]) else f"{r['rejections']:.0f}"
        print(f"| {name} | {r['alone']:.1f} | {r['plain']:.1f} | {r['plain'] / r['alone']:.2f} "
              f"| {r['beside']:.1f} | {r['beside'] / r['alone']:.2f} | {r['plain_own']:.1f} "
              f"| {r['own']:.1f} | {refusals} |")
    print("\n(tokens/s; the 8 plain streams' aggregate, and each ninth stream's own rate)")


if __name__ == "__main__":
    main()
