"""A model split across machines with llama.cpp's RPC backend, on loopback: two ggml-rpc-server
workers started here hold a tiny GGUF's layers, and greedy output equals one process's.

Needs llama-cpp-python built with GGML_RPC and the worker binary: `make test` builds both
(.venv/bin/ggml-rpc-server, by deploy/build-rpc-server.sh) and names it in GGSERVE_RPC_SERVER,
which makes a missing worker a failure; without that variable the tests skip, saying why.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from server.engine.rpc import rpc_supported, worker_devices
from server.errors import ModelLoadFailed
from tests.conftest import LiveServer, free_port
from tests.gguf_factory import SHAPES, write_gguf

RPC_SERVER = Path(os.environ.get("GGSERVE_RPC_SERVER")
                  or Path(sys.executable).parent / "ggml-rpc-server")


def _missing() -> str | None:
    if not rpc_supported():
        return ("llama-cpp-python was built without GGML_RPC (make installs it with "
                "CMAKE_ARGS=-DGGML_RPC=ON: `make clean test`)")
    if not RPC_SERVER.is_file():
        return f"no rpc-server worker at {RPC_SERVER} (`make rpc-server` builds it)"
    return None


if (why := _missing()) and os.environ.get("GGSERVE_RPC_SERVER"):
    raise RuntimeError(f"GGSERVE_RPC_SERVER is set but {why}")
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")


class Worker:
    """One ggml-rpc-server on a loopback port, as a worker machine runs it."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen([RPC_SERVER, "-H", "127.0.0.1", "-p", str(self.port),
                                      "-t", "1"], stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rpc-server did not start:\n{log.read_text()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._out.close()


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    logs = tmp_path_factory.mktemp("workers")
    started = [Worker(logs / f"worker{i}.log") for i in range(2)]
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def server(workers: list[Worker], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("rpc")
    # Four layers of f32 weights: enough for each worker to hold some (and the head).
    gguf = write_gguf(folder / "tiny.gguf", "llama",
                      shape=dataclasses.replace(SHAPES["tiny"], n_layer=4))
    registry = folder / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": {
        "local": {"path": str(gguf), "n_ctx": 256},
        "split": {"path": str(gguf), "n_ctx": 256, "n_gpu_layers": -1,
                  "rpc": [w.endpoint for w in workers], "tensor_split": [1, 1]},
    }}))
    live = LiveServer(["--models-file", str(registry), "--parallel", "2", "--threads", "1"])
    yield live
    live.stop()


def _complete(server: LiveServer, model: str, prompt: str) -> list[int]:
    """The greedy continuation's tokens (as log-probability entries name them)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0,
            "logprobs": 0}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    (choice,) = reply.json()["choices"]
    assert choice["finish_reason"] == "length"
    return list(choice["logprobs"]["tokens"])


def test_split_model_decodes_as_one_process(server: LiveServer, workers: list[Worker]) -> None:
    for prompt in ("Once upon a time", "The quick brown fox jumps over"):
        assert _complete(server, "split", prompt) == _complete(server, "local", prompt)
    listed = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    placement = listed["split"]["placement"]
    assert placement["device"].startswith("RPC") and placement["gpu_layers"] == 4
    for worker in workers:  # each holds a connection open: the loaded model's buffers
        log = worker.log.read_text()
        assert log.count("Accepted client connection") - log.count("connection closed") == 1


def test_an_unreachable_worker_fails_only_that_load() -> None:
    with pytest.raises(ModelLoadFailed, match=r"cannot reach the rpc-server worker at "
                                              r"127\.0\.0\.1:\d+"):
        worker_devices([f"127.0.0.1:{free_port()}"], timeout=2)
