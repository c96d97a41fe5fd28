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
