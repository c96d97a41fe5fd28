"""Shared fixtures: the default model's file, and a real server on a loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama

from server.engine.llama.native import build_has_amx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _default_sigint() -> None:
    """In the server's process: Ctrl-C as a terminal delivers it, even where the tests run in
    the background of a shell without job control, which starts them with SIGINT ignored (the
    server then inherits that, and Python raises no KeyboardInterrupt for it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LiveServer:
    """`python -m server` in a subprocess, as a user runs it."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = ROOT / ".pytest_cache" / f"server-{self.port}.log"
        self.log.parent.mkdir(exist_ok=True)
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(self.port), *args],
            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self._log_file,
            stderr=subprocess.STDOUT, preexec_fn=_default_sigint)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{self.log.read_text()}")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample from /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, label_text = key.partition("{")
            have = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
            if metric == name and have == want:
                return float(value)
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log_file.close()


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    """The default model served by the real llama.cpp engine."""
    live = LiveServer(["--parallel", "4"])
    yield live
    live.stop()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from server.registry import Registry
    from server.settings import Settings

    settings = Settings()
    registry = Registry.load(settings.models_file, settings.templates_dir, settings.models_dir)
    return registry.local_file(registry.get(registry.default))


def reference_llama(path: Path, **kwargs: Any) -> Llama:
    """llama-cpp-python's own Llama on `path`, with the server's weight layout: no AMX
    repacking, which its high-level API cannot turn off by itself."""
    with pytest.MonkeyPatch.context() as patch:
        if build_has_amx():
            defaults = llama_cpp.llama_model_default_params

            def no_repack() -> Any:
                params = defaults()
                params.use_extra_bufts = False
                return params

            patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", no_repack)
        return Llama(str(path), **{"n_threads": 2, "verbose": False, **kwargs})


def log_softmax(llm: Llama, tokens: list[int]) -> np.ndarray[Any, Any]:
    """The log-softmax of each position's logits as llama-cpp-python evaluates `tokens`."""
    llm.reset()
    llm.eval(tokens)
    scores = np.array(llm.scores[:len(tokens)], dtype=np.float64)
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # type: ignore[no-any-return]
