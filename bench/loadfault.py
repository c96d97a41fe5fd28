"""Load-and-fault run: many clients on loopback, some disconnecting mid-stream or sending garbage.

Starts `python -m server` (the default model, with a user key and an admin key) on a loopback
port, drives it for --duration seconds with --clients concurrent clients, then reports requests
served, well-formed requests lost, errors by kind, 5xx answers (seen by clients and counted by
the server), latency p50/p95 of well-formed requests, the server's memory after warm-up and at
the end, and whether it is still healthy. Besides well-formed requests the clients send malformed
ones, lone surrogates in several fields, a well-formed request on the keep-alive connection that
just answered an error, huge prompts for the chat renderer, and admin calls without the admin
key or as text/plain. Bounded in time and count; stops by itself; loopback only.

    .venv/bin/python bench/loadfault.py --duration 180 --clients 16 [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
USER_KEY, ADMIN_KEY = "loadfault-user", "loadfault-admin"


@dataclass
class Tally:
    served: int = 0  # well-formed requests answered completely
    lost: int = 0  # well-formed requests not answered completely (mid-stream drops aside)
    five_xx: int = 0  # 5xx answers seen by clients
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
            tally.lost += 1
            tally.five_xx += resp.status_code >= 500
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
        tally.lost += 1
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
        tally.lost += 1
        tally.five_xx += resp.status_code >= 500
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


LONE = "\ud800"  # json.dumps writes it as the escape \ud800, which decodes to a lone surrogate
USER = {"role": "user", "content": "x"}
SURROGATES = [  # (field, path, body): each must be a 400 naming the field
    ("content", "/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": f"a{LONE}b"}]}),
    ("prompt", "/v1/completions", {"model": MODEL, "prompt": f"{LONE}x"}),
    ("model", "/v1/chat/completions", {"model": f"smollm{LONE}", "messages": [USER]}),
    ("stop", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": [f"{LONE}"]}),
    ("description", "/v1/chat/completions", {"model": MODEL, "messages": [USER], "tools": [
        {"type": "function", "function": {"name": "f", "description": f"d{LONE}",
                                          "parameters": {"type": "object"}}}]}),
    ("enum", "/v1/chat/completions", {"model": MODEL, "messages": [USER], "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "string", "enum": [f"e{LONE}"]}}}}),
    ("input", "/v1/embeddings", {"model": MODEL, "input": [f"{LONE}"]}),
    ("prompt", "/tokenize", {"model": MODEL, "prompt": f"\udc80{LONE}"}),
]
HUGE = [  # (kind, body, expected): the renderer and tokenizer meet huge content
    ("one 1 MB message", {"model": MODEL, "messages": [
        {"role": "user", "content": "lorem ipsum " * 90_000}]}, 400),
    ("5,000 messages", {"model": MODEL, "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"}
        for i in range(5000)]}, 400),
    ("5 MB body", {"model": MODEL, "messages": [
        {"role": "user", "content": "z" * 5_000_000}]}, 413),
]
ADMIN = [  # (kind, path, headers, content, expected): never the admin key with a JSON body
    ("load, user key", "/models/load", {}, json.dumps({"model": MODEL}), 403),
    ("unload, user key", "/models/unload", {}, json.dumps({"model": MODEL}), 403),
    ("reload, user key", "/admin/reload", {}, "", 403),
    ("reload, no key", "/admin/reload", {"authorization": ""}, "", 401),
    ("load, no key", "/models/load", {"authorization": ""}, json.dumps({"model": MODEL}), 401),
    ("reload, admin key, text/plain", "/admin/reload",
     {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "text/plain"}, "{}", 415),
    ("unload, admin key, text/plain", "/models/unload",
     {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "text/plain"},
     json.dumps({"model": MODEL}), 415),
    ("reload, admin key, other origin", "/admin/reload",
     {"authorization": f"Bearer {ADMIN_KEY}", "origin": "https://evil.example"}, "", 403),
]


def refused(tally: Tally, kind: str, resp: httpx.Response, expected: int,
            needle: str = "") -> None:
    """Record an error answer: the expected status, a JSON error message (naming `needle`)."""
    if resp.status_code >= 500:
        tally.five_xx += 1
    error = resp.json().get("error", {}) if resp.headers.get("content-type", "").startswith(
        "application/json") else {}
    message = str(error.get("message", ""))
    if resp.status_code != expected or not message or needle not in message or (
            "x-request-id" not in resp.headers):
        tally.failures.append(f"{kind}: HTTP {resp.status_code} {resp.text[:200]}")
        return
    tally.outcomes[f"rejected: {kind} ({expected})"] += 1


async def garbage(http: httpx.AsyncClient, tally: Tally) -> None:
    kind, payload, expected = random.choice(GARBAGE)
    resp = await http.post("/v1/chat/completions", content=payload,
                           headers={"content-type": "application/json"})
    refused(tally, kind, resp, expected)


async def surrogate(http: httpx.AsyncClient, tally: Tally) -> None:
    name, path, body = random.choice(SURROGATES)
    resp = await http.post(path, content=json.dumps(body),  # ASCII, the surrogate escaped
                           headers={"content-type": "application/json"})
    refused(tally, f"lone surrogate in {name}, {path}", resp, 400, name)


async def huge(http: httpx.AsyncClient, tally: Tally) -> None:
    kind, body, expected = random.choice(HUGE)
    resp = await http.post("/v1/chat/completions", json=body)
    refused(tally, f"huge render, {kind}", resp, expected)


async def admin(http: httpx.AsyncClient, tally: Tally) -> None:
    kind, path, headers, content, expected = random.choice(ADMIN)
    headers = {"content-type": "application/json", **headers} if content else headers
    resp = await http.post(path, content=content, headers=headers)
    refused(tally, f"admin {kind}", resp, expected)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines
                  if line.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def keep_alive(url: str, tally: Tally) -> None:
    """An error answer, then a well-formed request on the same connection: it must be served."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    start = time.perf_counter()
    try:
        _, path, bad = random.choice(SURROGATES)
        good = {"model": MODEL, "prompt": f"Fact {random.random()}:", "max_tokens": 16,
                "logit_bias": NO_EOS}
        statuses = []
        for target, body in ((path, bad), ("/v1/completions", good)):
            payload = json.dumps(body).encode()
            writer.write(f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         f"Authorization: Bearer {USER_KEY}\r\n"
                         "Content-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            await writer.drain()
            status, data = await read_response(reader)
            statuses.append(status)
        tally.five_xx += sum(status >= 500 for status in statuses)
        if statuses != [400, 200] or json.loads(data)["usage"]["completion_tokens"] != 16:
            tally.lost += 1
            tally.failures.append(f"keep-alive: HTTP {statuses} {data[:200]!r}")
            return
    except (OSError, asyncio.IncompleteReadError, StopIteration) as exc:
        tally.lost += 1
        tally.failures.append(f"keep-alive: {exc!r}")
        return
    finally:
        writer.close()
    tally.served += 1
    tally.outcomes["completion ok after a 400 on the same connection"] += 1
    tally.latencies.append(time.perf_counter() - start)


async def client_loop(url: str, deadline: float, max_requests: int, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 headers={"authorization": f"Bearer {USER_KEY}"}) as http:
        for _ in range(max_requests):
            if time.monotonic() > deadline:
                return
            roll = random.random()
            try:
                if roll < 0.30:
                    await stream_chat(http, tally, disconnect=False)
                elif roll < 0.45:
                    await stream_chat(http, tally, disconnect=True)
                elif roll < 0.60:
                    await completion(http, tally)
                elif roll < 0.72:
                    await garbage(http, tally)
                elif roll < 0.82:
                    await surrogate(http, tally)
                elif roll < 0.90:
                    await keep_alive(url, tally)
                elif roll < 0.95:
                    await huge(http, tally)
                else:
                    await admin(http, tally)
            except httpx.HTTPError as exc:
                tally.lost += roll < 0.60  # a well-formed request
                tally.failures.append(f"transport: {exc!r}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(duration: float, clients: int, max_requests: int) -> dict[str, object]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path("/tmp") / f"loadfault-{port}.log", "w")  # noqa: SIM115
    env = {**os.environ, "GGSERVE_API_KEYS": json.dumps([USER_KEY]),
           "GGSERVE_ADMIN_KEYS": json.dumps([ADMIN_KEY])}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    auth = {"authorization": f"Bearer {USER_KEY}"}
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

        rss_every_30s: list[float] = []

        async def sample_rss(deadline: float) -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(min(30.0, max(0.0, deadline - time.monotonic())))
                rss_every_30s.append(round(rss_mib(proc.pid), 1))

        async def all_clients() -> None:
            deadline = time.monotonic() + duration
            await asyncio.gather(sample_rss(deadline), *(
                client_loop(url, deadline, max_requests, tally) for _ in range(clients)))

        began = time.monotonic()
        asyncio.run(all_clients())
        elapsed = time.monotonic() - began
        time.sleep(1.0)
        rss_end = rss_mib(proc.pid)
        healthy = httpx.get(f"{url}/health", headers=auth).status_code == 200 and httpx.get(
            f"{url}/ready", headers=auth).status_code == 200
        metrics = httpx.get(f"{url}/metrics", headers=auth).text
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
        "unexpected_count": len(tally.failures), "lost_well_formed": tally.lost,
        "client_5xx": tally.five_xx, "server_5xx": five_xx,
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
        "rss_after_warmup_mib": round(rss_start, 1), "rss_end_mib": round(rss_end, 1),
        "rss_every_30s_mib": rss_every_30s,
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
    if args.write:  # replace the run between the markers; the rest of the page stays
        doc = ROOT / "docs" / "reliability.md"
        head, _, rest = doc.read_text().partition("<!-- loadfault -->\n")
        _, _, tail = rest.partition("<!-- /loadfault -->\n")
        doc.write_text(
            f"{head}<!-- loadfault -->\nLatest `bench/loadfault.py` run "
            f"({time.strftime('%Y-%m-%d')}, {args.clients} clients for {args.duration:g} s on "
            "a 2-core development VM, default model, nothing else running):\n\n"
            f"{text}\n<!-- /loadfault -->\n{tail}")
    ok = (result["unexpected_count"] == 0 and result["lost_well_formed"] == 0
          and result["client_5xx"] == 0 and result["server_5xx"] == 0
          and result["healthy_after"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
