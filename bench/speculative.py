"""Speculative decoding for one stream: decode tokens/s without it, with prompt lookup (n-gram)
and with a draft model, ggserve against llama-server on the same GGUF files.

Two workloads, each one streamed greedy request at a time: `rewrite`, a chat request to repeat
a paragraph (the reply copies its prompt: prompt lookup's case), and `free`, a story continued
with its end tokens suppressed (little to look up; what a draft model must predict). ggserve
serves three registry entries of the same file (off, `speculative: {ngram: true}`, `draft:`);
llama-server runs once per mode (`--spec-type ngram-simple`, `--spec-type draft-simple
--model-draft`), with the same draft lengths. All servers stay up; every round runs each
(server, mode) once per workload, the order alternating from round to round. A figure is
(completion tokens - 1) / (time from the first streamed token to the last); the table shows
medians, each mode's speed-up over the same server without speculation, the acceptance rate
from each server's /metrics, and whether the text equals the same server's without it.

    .venv/bin/python bench/speculative.py --llama-server /work/llama-build/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serve import write_report
from bench.servers import (
    Server,
    default_model_file,
    free_port,
    ggserve_command,
    llama_server_command,
    sse_chunks,
)

MODES = ("off", "ngram", "draft")
SERVERS = ("ggserve", "llama-server")
N_CTX = 2048
PARAGRAPH = (
    "The committee met on Tuesday to review the budget for the new library. After a long "
    "discussion about costs, staffing and opening hours, the members agreed to approve the plan "
    "and to publish a report by the end of the month. The library will open on weekdays from "
    "nine in the morning until eight in the evening, and on Saturdays until noon. Children "
    "under twelve will need a parent to sign up for a card, and every card holder may borrow up "
    "to ten books at a time. The old building on Main Street will be sold, and the money will "
    "pay for new computers, a reading room and a small garden behind the new library.")
WORKLOADS = {
    "rewrite": {"messages": [{"role": "user",
                              "content": f"Repeat this text exactly:\n\n{PARAGRAPH}"}]},
    "free": {"prompt": "Once upon a time, in a small village by the sea, there lived"},
}


@dataclass(frozen=True)
class Run:
    rate: float  # decode tokens/s
    text: str


def ggserve_registry(mode: str, model: Path, draft: Path, args: argparse.Namespace) -> Path:
    """The one entry `bench`, speculating as `mode` says (and the draft model's entry)."""
    lengths = f"draft_max: {args.draft_max}, draft_p_min: {args.draft_p_min}"
    extra = {"off": "",
             "ngram": f"    speculative: {{ngram: true, {lengths}}}\n",
             "draft": f"    draft: drafter\n    speculative: {{{lengths}}}\n"}[mode]
    path = Path(tempfile.mkdtemp()) / "models.yaml"
    path.write_text(
        f"models:\n  bench:\n    path: {model}\n    n_ctx: {N_CTX}\n"
        f"    sampling: {{repeat_penalty: 1.0}}\n{extra}"
        f"  drafter:\n    path: {draft}\n    n_ctx: {N_CTX}\n")
    return path


def llama_server_flags(mode: str, draft: Path, args: argparse.Namespace) -> tuple[str, ...]:
    common = ("--no-repack", "--metrics")
    if mode == "ngram":  # the closest to prompt lookup: the last n tokens' latest occurrence
        return (*common, "--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                "--spec-ngram-simple-size-m", str(args.draft_max))
    if mode == "draft":
        return (*common, "--spec-type", "draft-simple", "--model-draft", str(draft),
                "--spec-draft-n-max", str(args.draft_max), "--spec-draft-p-min",
                str(args.draft_p_min))
    return common


def body(workload: str, model: str, args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    fields: dict[str, object] = {"model": model, "temperature": 0, "stream": True,
                                 "stream_options": {"include_usage": True}, **WORKLOADS[workload]}
    if workload == "free":
        return "/v1/completions", {**fields, "max_tokens": args.max_tokens,
                                   "logit_bias": args.bias}
    return "/v1/chat/completions", {**fields, "max_tokens": 2 * args.max_tokens}


async def one_run(client: httpx.AsyncClient, url: str, path: str,
                  fields: dict[str, object]) -> Run:
    first = last = 0.0
    tokens, parts = 0, []
    async with client.stream("POST", url + path, json=fields, timeout=900) as resp:
        async for chunk in sse_chunks(resp):
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices") or []:
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if piece:
                    last = time.perf_counter()
                    first = first or last
                    parts.append(piece)
    return Run((tokens - 1) / (last - first) if last > first else 0.0, "".join(parts))


def accepted_drafted(url: str, server: str, model: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    if server == "ggserve":
        names = ("ggserve:spec_accepted_tokens_total", "ggserve:spec_draft_tokens_total")
        label = f'model="{model}"'
    else:
        names = ("llamacpp:spec_decode_num_accepted_tokens_total",
                 "llamacpp:spec_decode_num_draft_tokens_total")
        label = ""
    totals = []
    for name in names:
        pattern = rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$"
        totals.append(sum(float(m.group(2)) for m in re.finditer(pattern, text, re.M)
                          if label in (m.group(1) or "")))
    return totals[0], totals[1]


Key = tuple[str, str, str]  # server, mode, workload


async def measure(targets: dict[tuple[str, str], tuple[str, str]], args: argparse.Namespace,
                  ) -> tuple[dict[Key, list[Run]], dict[Key, float]]:
    """Runs by (server, mode, workload), and the acceptance rate of each."""
    runs: dict[Key, list[Run]] = {}
    counts: dict[Key, tuple[float, float]] = {}
    keys = list(targets)
    async with httpx.AsyncClient() as client:
        for url, model in targets.values():  # warm-up: loads, first request
            path, fields = body("free", model, argparse.Namespace(**{**vars(args),
                                                                     "max_tokens": 8}))
            await one_run(client, url, path, fields)
        for rnd in range(args.repeat):
            for workload in WORKLOADS:
                for server, mode in keys if rnd % 2 == 0 else keys[::-1]:
                    url, model = targets[server, mode]
                    path, fields = body(workload, model, args)
                    before = accepted_drafted(url, server, model)
                    run = await one_run(client, url, path, fields)
                    after = accepted_drafted(url, server, model)
                    key = (server, mode, workload)
                    runs.setdefault(key, []).append(run)
                    old = counts.get(key, (0.0, 0.0))
                    counts[key] = (old[0] + after[0] - before[0], old[1] + after[1] - before[1])
                    print(f"  round {rnd + 1} {workload:8} {server:12} {mode:6} "
                          f"{run.rate:7.1f} tok/s", flush=True)
    rates = {key: acc / drafted if drafted else 0.0 for key, (acc, drafted) in counts.items()}
    return runs, rates


def table(runs: dict[Key, list[Run]], rates: dict[Key, float]) -> str:
    head = ["workload", "mode", "ggserve tok/s", "llama-server tok/s", "ratio",
            "speed-up (ggserve)", "speed-up (llama-server)", "acceptance (ggserve)",
            "acceptance (llama-server)", "same text as off (ggserve / llama-server)",
            "ggserve runs", "llama-server runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload in WORKLOADS:
        for mode in MODES:
            med = {s: statistics.median(r.rate for r in runs[s, mode, workload]) for s in SERVERS}
            off = {s: statistics.median(r.rate for r in runs[s, "off", workload])
                   for s in SERVERS}
            same = [all(r.text == runs[s, "off", workload][0].text
                        for r in runs[s, mode, workload]) for s in SERVERS]
            accept = [f"{rates[s, mode, workload]:.0%}" if mode != "off" else ""
                      for s in SERVERS]
            spread = [" / ".join(f"{r.rate:.0f}" for r in runs[s, mode, workload])
                      for s in SERVERS]
            lines.append(
                f"| {workload} | {mode} | {med['ggserve']:.1f} | {med['llama-server']:.1f} | "
                f"{med['ggserve'] / med['llama-server']:.2f}x | "
                f"{med['ggserve'] / off['ggserve']:.2f}x | "
                f"{med['llama-server'] / off['llama-server']:.2f}x | {accept[0]} | {accept[1]} | "
                f"{'yes' if same[0] else 'no'} / {'yes' if same[1] else 'no'} | "
                f"{spread[0]} | {spread[1]} |")
    return "\n".join(lines)


def end_token_bias(model: Path) -> dict[str, float]:
    from server.engine.llama.native import NativeModel, init_backend

    init_backend()
    vocab = NativeModel(model, n_gpu_layers=0, repack=False)
    return {str(t): -100.0 for t in range(vocab.n_vocab) if vocab.is_eog(t)}


def main(args: argparse.Namespace) -> str:
    binary = Path(args.llama_server or "")
    if not binary.is_file():
        raise SystemExit(f"needs a llama-server binary: --llama-server or LLAMA_SERVER "
                         f"(got {args.llama_server!r})")
    model = args.model.resolve()
    draft = (args.draft or args.model).resolve()
    args.bias = end_token_bias(model)
    # One process per server and mode: in one ggserve process each model's scheduler thread
    # has an OpenMP team of its own, and once two of them live, llama_decode on a 2-core CPU
    # took 3x as long (8 ms against 26 ms a token, OMP_WAIT_POLICY and GOMP_SPINCOUNT or not).
    servers, targets = [], {}
    for mode in MODES:
        port = free_port()
        servers.append(Server(f"ggserve-{mode}", ggserve_command(
            port, ggserve_registry(mode, model, draft, args), args.threads, 1,
            ("--cpu-repack", "off")), port))
        targets["ggserve", mode] = (servers[-1].url, "bench")
        port = free_port()
        servers.append(Server(f"llama-server-{mode}", llama_server_command(
            binary, model, port, args.threads, 1, N_CTX, llama_server_flags(mode, draft, args)),
            port))
        targets["llama-server", mode] = (servers[-1].url, "bench")
    load_before = os.getloadavg()[0]
    try:
        async def start_and_measure() -> tuple[dict[Key, list[Run]], dict[Key, float]]:
            for server in servers:
                await server.ready()
            return await measure(targets, args)

        runs, rates = asyncio.run(start_and_measure())
    finally:
        for server in servers:
            server.stop()
    same_file = "the model itself" if draft == model else draft.name
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{args.threads} threads; model {model.name}, draft model {same_file}; one "
               f"stream, greedy; draft_max {args.draft_max}, draft_p_min {args.draft_p_min}; "
               f"free: {args.max_tokens} tokens, end tokens suppressed; median of {args.repeat} "
               f"alternating rounds; 1-minute load average {load_before:.1f} before, "
               f"{os.getloadavg()[0]:.1f} after")
    return f"{machine}\n\n{table(runs, rates)}\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="default: the default model")
    parser.add_argument("--draft", type=Path, help="the draft GGUF (default: the model itself)")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--draft-max", type=int, default=16)
    parser.add_argument("--draft-p-min", type=float, default=0.75)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write", action="store_true",
                        help="record the table in docs/benchmarks.md (label: --label)")
    parser.add_argument("--label", default="speculative-cpu")
    args = parser.parse_args(argv)
    args.model = args.model or default_model_file()
    return args


if __name__ == "__main__":
    arguments = parse()
    report = main(arguments)
    print(report)
    if arguments.write:
        write_report(arguments.label, report)
