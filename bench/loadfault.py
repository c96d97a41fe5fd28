"""Load-and-fault run: many clients on loopback, some disconnecting mid-stream or sending garbage.

Starts `python -m server` (the default model) on a loopback port, drives it for --duration
seconds with --clients concurrent clients, then reports requests served, errors by kind,
latency p50/p95 of well-formed requests, the server's memory after warm-up and at the end, and
whether it is still healthy. Bounded in time and count; stops by itself; loopback only.

    .venv/bin/python bench/loadfault.py --duration 180 --clients 16 [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
NO_EOS = {"0": -100, "2": -100, "4": -100}


@dataclass
class Tally:
    served: int = 0  # well-formed requests answered completely
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # anything unexpected, described


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def stream_chat(http: httpx.AsyncClient, tally: Tally, disconnect: bool) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": 48, "logit_bias": NO_EOS,
            "messages": [{"role": "user", "content": f"Story {random.random()}"}]}
    start = time.perf_counter()
    chunks, done = 0, False
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            tally.failures.append(f"stream: HTTP {resp.status_code}")
            return
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                if "error" in json.loads(line[6:]):
                    tally.failures.append(f"stream: in-band error {line[:200]}")
                chunks += 1
                if disconnect and chunks == 4:
                    tally.outcomes["disconnected mid-stream"] += 1
                    return  # leaving the block closes the connection
    if not done or chunks < 48:
        tally.failures.append(f"stream: incomplete ({chunks} chunks, done={done})")
        return
    tally.served += 1
    tally.outcomes["stream ok"] += 1
    tally.latencies.append(time.perf_counter() - start)


async def completion(http: httpx.AsyncClient, tally: Tally) -> None:
    start = time.perf_counter()
    resp = await http.post("/v1/completions", json={
        "model": MODEL, "prompt": f"Fact {random.random()}:", "max_tokens": 16,
        "logit_bias": NO_EOS})
    if resp.status_code != 200 or resp.json()["usage"]["completion_tokens"] != 16:
        tally.failures.append(f"completion: HTTP {resp.status_code} {resp.text[:200]}")
        return
    tally.served += 1
    tally.outcomes["completion ok"] += 1
    tally.latencies.append(time.perf_counter() - start)


GARBAGE = [
    ("malformed JSON", b'{"model": "smollm2', 400),
    ("wrong types", json.dumps({"model": MODEL, "messages": "hi", "n": "two"}).encode(), 400),
    ("unknown model", json.dumps({"model": "gpt-9", "messages": [
        {"role": "user", "content": "x"}]}).encode(), 404),
    ("context overflow", json.dumps({"model": MODEL, "max_tokens": 9000, "messages": [
        {"role": "user", "content": "x"}]}).encode(), 400),
    ("bad role", json.dumps({"model": MODEL, "messages": [
        {"role": "wizard", "content": "x"}]}).encode(), 400),
]


async def garbage(http: httpx.AsyncClient, tally: Tally) -> None:
    kind, payload, expected = random.choice(GARBAGE)
    resp = await http.post("/v1/chat/completions", content=payload,
                           headers={"content-type": "application/json"})
    error = resp.json().get("error", {}) if resp.headers.get("content-type", "").startswith(
        "application/json") else {}
    if resp.status_code != expected or not error.get("message"):
        tally.failures.append(f"garbage {kind}: HTTP {resp.status_code} {resp.text[:200]}")
        return
    tally.outcomes[f"rejected: {kind} ({expected})"] += 1


async def client_loop(url: str, deadline: float, max_requests: int, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for _ in range(max_requests):
            if time.monotonic() > deadline:
                return
            roll = random.random()
            try:
                if roll < 0.35:
                    await stream_chat(http, tally, disconnect=False)
                elif roll < 0.55:
                    await stream_chat(http, tally, disconnect=True)
                elif roll < 0.75:
                    await completion(http, tally)
                else:
                    await garbage(http, tally)
            except httpx.HTTPError as exc:
                tally.failures.append(f"transport: {exc!r}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(duration: float, clients: int, max_requests: int) -> dict[str, object]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path("/tmp") / f"loadfault-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        warm = Tally()
        asyncio.run(client_loop(url, time.monotonic() + 5, 10, warm))  # warm-up
        rss_start = rss_mib(proc.pid)
        tally = Tally()

        async def all_clients() -> None:
            deadline = time.monotonic() + duration
            await asyncio.gather(*(client_loop(url, deadline, max_requests, tally)
                                   for _ in range(clients)))

        began = time.monotonic()
        asyncio.run(all_clients())
        elapsed = time.monotonic() - began
        time.sleep(1.0)
        rss_end = rss_mib(proc.pid)
        healthy = httpx.get(f"{url}/health").status_code == 200 and httpx.get(
            f"{url}/ready").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        five_xx = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("ggserve:http_requests_total") and '"5xx"' in line)
        running = [line for line in metrics.splitlines()
                   if line.startswith("ggserve:num_sequences_running")]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    lat = sorted(tally.latencies)
    return {
        "duration_s": round(elapsed, 1), "clients": clients, "served": tally.served,
        "outcomes": dict(tally.outcomes), "unexpected": tally.failures[:20],
        "unexpected_count": len(tally.failures), "server_5xx": five_xx,
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
        "rss_after_warmup_mib": round(rss_start, 1), "rss_end_mib": round(rss_end, 1),
        "healthy_after": healthy, "sequences_running_after": running,
    }


def report(result: dict[str, object]) -> str:
    rows = [f"| {k} | {v} |" for k, v in result.items() if k not in ("outcomes", "unexpected")]
    outcomes = [f"| {k} | {v} |" for k, v in sorted(result["outcomes"].items())]  # type: ignore[attr-defined]
    return "\n".join(["| measure | value |", "|---|---|", *rows, "", "| outcome | count |",
                      "|---|---|", *outcomes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-requests", type=int, default=10_000, help="per client")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    parser.add_argument("--write", action="store_true", help="update docs/reliability.md")
    args = parser.parse_args()
    result = run(args.duration, args.clients, args.max_requests)
    text = report(result)
    print(json.dumps(result) if args.json else text)
    if args.write:
        (ROOT / "docs" / "reliability.md").write_text(
            "# Reliability\n\nLatest `bench/loadfault.py` run "
            f"({time.strftime('%Y-%m-%d')}, {args.clients} clients for {args.duration:g} s on "
            "a 2-core development VM, default model):\n\n" + text + "\n\n"
            "Mix: 35% streamed chats read to the end, 20% streamed chats dropped after 4 "
            "chunks, 20% completions, 25% malformed or invalid requests (malformed JSON, wrong "
            "types, unknown model, context overflow, bad role). Reproduce with "
            "`make loadfault`.\n")
    ok = (result["unexpected_count"] == 0 and result["server_5xx"] == 0
          and result["healthy_after"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
