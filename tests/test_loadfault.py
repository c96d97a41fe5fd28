"""A short load-and-fault run in CI (the long one is `make loadfault`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_short_load_and_fault_run_loses_nothing() -> None:
    run = subprocess.run([sys.executable, "bench/loadfault.py", "--duration", "10",
                          "--clients", "6", "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=180)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0, result
    assert result["unexpected_count"] == 0 and result["server_5xx"] == 0
    assert result["healthy_after"] and result["served"] > 0
    assert result["outcomes"].get("disconnected mid-stream", 0) > 0
    assert any(k.startswith("rejected") for k in result["outcomes"])
    assert result["rss_end_mib"] < result["rss_after_warmup_mib"] * 1.25


@pytest.mark.slow
def test_concurrent_huge_bodies_leave_no_high_water_mark() -> None:
    """16 clients at once sending 1-5 MB bodies: RSS comes back near where it started (glibc
    kept ~200 MB of heap after such a burst before the server set its mmap threshold)."""
    import threading

    import httpx

    from bench.loadfault import HUGE, rss_mib
    from tests.conftest import LiveServer

    live = LiveServer(["--parallel", "2"])
    try:
        bodies = [(json.dumps(body).encode(), expected) for _, body, expected in HUGE]
        statuses: list[int] = []

        def client() -> None:
            with httpx.Client(timeout=120) as http:
                for _ in range(3):
                    for content, _ in bodies:
                        statuses.append(http.post(
                            f"{live.url}/v1/chat/completions", content=content,
                            headers={"content-type": "application/json"}).status_code)

        before = rss_mib(live.proc.pid)
        threads = [threading.Thread(target=client) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(set(statuses)) == sorted({expected for _, expected in bodies})
        assert rss_mib(live.proc.pid) - before < 100, (before, rss_mib(live.proc.pid))
    finally:
        live.stop()
