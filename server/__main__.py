"""`python -m server`: parse flags and environment into Settings, then serve."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from server import hub
from server.app import create_app
from server.errors import ModelLoadFailed, RegistryError, ServerError
from server.logs import configure_logging
from server.registry import Registry
from server.settings import Settings

log = logging.getLogger("server")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _parse(argv: list[str]) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        prog="ggserve",
        description="Serve GGUF models over an OpenAI-compatible API (also `python -m "
                    "server`). Every flag can also be set as an environment variable "
                    "GGSERVE_<NAME> (e.g. GGSERVE_PORT). `ggserve pull ID[:QUANT]...` downloads "
                    "registry models ahead of serving (see `ggserve pull --help`).")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--models-file", type=Path, help="the registry (default models.yaml)")
    parser.add_argument("--default-model", help="registry id loaded at start")
    parser.add_argument("--parallel", type=int, help="sequences decoded together per model")
    parser.add_argument("--threads", type=int, help="CPU threads for llama.cpp")
    parser.add_argument("--cpu-repack", choices=["auto", "on", "off"],
                        help="llama.cpp CPU weight repacking (auto: off where AMX would crash)")
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"],
                        help="llama.cpp flash attention (auto: where the backend has it)")
    parser.add_argument("--backend-sampling", choices=["auto", "on", "off"],
                        help="sample inside the decode graph where a request allows "
                        "(default off; auto: when layers are on a GPU)")
    parser.add_argument("--gap-fill", choices=["auto", "on", "off"],
                        help="filler rows in the gaps between running sequences, so a step "
                        "is one pass over the weights (default auto: any gap on a GPU, gaps of "
                        "one sequence on the CPU)")
    parser.add_argument("--speculative", choices=["registry", "ngram", "off"],
                        help="speculative decoding: as models.yaml says (default), also "
                        "prompt lookup (ngram) for every model, or off")
    parser.add_argument("--no-ui", dest="ui", action="store_false", default=None,
                        help="do not serve the chat page at /")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["text", "json"],
                        help="text (default) or JSON lines")
    parser.add_argument("--drain-s", type=float,
                        help="on SIGTERM, seconds of /ready=503 before shutting down")
    args = vars(parser.parse_args(argv))
    return {key: value for key, value in args.items() if value is not None}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["pull"]:
            sys.exit(pull(argv[1:]))
        serve(argv)
    except KeyboardInterrupt:
        # Ctrl-C: uvicorn has shut down gracefully and re-raised it (or it came before serving);
        # the shell's exit status for SIGINT, without Python's traceback
        sys.exit(128 + signal.SIGINT)


def serve(argv: list[str]) -> None:
    """Check the port, load the app and serve it until a signal stops it."""
    return_big_buffers_to_the_os()
    try:
        settings = Settings(**_parse(argv))  # type: ignore[arg-type]
    except ValidationError as exc:
        sys.exit(f"invalid settings: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    # before anything loads: a busy port would otherwise show only after the model has loaded
    # (minutes for a large one), when uvicorn binds
    problem = port_problem(settings.host, settings.port)
    if problem:
        sys.exit(f"error: {problem}")
    try:
        app = create_app(settings)
    except RegistryError as exc:
        sys.exit(f"error: {exc}")
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, log_config=None, access_log=False,
                            timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)))
    DrainingServer(config, app, settings.drain_s).run()


def return_big_buffers_to_the_os() -> None:
    """Serve every allocation of 1 MiB or more (a request body, its parsed JSON, a rendered
    prompt) from its own mapping, returned to the OS when freed.

    glibc otherwise raises its mmap threshold after the first such buffer is freed and serves
    later ones from its heaps, which keep their high-water mark: 16 clients sending 1-5 MB
    bodies left the process ~250 MB larger, varying by 100 MB from sample to sample
    (docs/reliability.md). Smaller allocations (a 152K-vocabulary logits row is 608 KB) stay
    on the heap, so per-token work pays no system call.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def pull(argv: list[str]) -> int:
    """`python -m server pull ID[:QUANT]...`: download registry models (and their LoRA
    adapters) ahead of serving."""
    parser = argparse.ArgumentParser(prog="ggserve pull",
                                     description="Download registry models from the Hub "
                                                 "(resuming a partial download).")
    parser.add_argument("models", nargs="+", help="registry ids, optionally id:QUANT")
    parser.add_argument("--models-file", type=Path, help="the registry (default models.yaml)")
    args = parser.parse_args(argv)
    settings = Settings(**({"models_file": args.models_file} if args.models_file else {}))
    configure_logging(settings.log_level, settings.log_format)
    try:
        registry = Registry.load(settings.models_file, settings.templates_dir,
                                 settings.models_dir)
        for model in args.models:
            spec = registry.get(model)
            target = registry.local_file(spec)
            if target.is_file():
                log.info("%s: already at %s", spec.id, target)
            elif spec.repo is None:
                raise ModelLoadFailed(f"{spec.id}: its file is missing and it names no 'repo' "
                                      "to download it from")
            else:
                hub.download(spec.repo, spec.file_name, target, show_bar=True)
            for adapter in spec.lora:  # its LoRA adapters from the Hub too
                file = registry.lora_file(adapter)
                if adapter.repo is not None and not file.is_file():
                    hub.download(adapter.repo, str(adapter.file), file, show_bar=True)
    except (RegistryError, ServerError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def port_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (a bind test, as uvicorn will bind), else None."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve --host {host}: {exc.strerror}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            # as asyncio sets it for uvicorn: a port left in TIME_WAIT by a previous run is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return (f"cannot listen on {host}:{port}: {exc.strerror}; is another server "
                        "running there? Choose another --port (GGSERVE_PORT).")
    return None


class DrainingServer(uvicorn.Server):
    """On SIGTERM or Ctrl-C: /ready turns 503 at once, the server keeps serving for `drain_s`
    so load balancers take it out, then stops accepting and lets running streams finish.
    A second Ctrl-C stops waiting for them."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_s = drain_s
        self._stopping = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._app.state.accepting = False
        again, self._stopping = self._stopping, True
        if again and sig == signal.SIGINT:
            # uvicorn forces only once its own shutdown began; a drain has not begun it yet.
            # Streams still running end with an error event and [DONE] as they are cancelled.
            log.warning("second Ctrl-C: exiting without waiting for running requests")
            self.should_exit = self.force_exit = True
            self._captured_signals.append(sig)
            return
        if again or not self._drain_s:
            super().handle_exit(sig, frame)
            return
        log.info("signal %d: /ready is now 503; draining for %g s before shutdown", sig,
                 self._drain_s)
        timer = threading.Timer(self._drain_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips the app's shutdown when forced, asyncio.run then cancels it and
            # uvicorn logs that as a traceback. Stopping the engine takes milliseconds and ends
            # the running streams (error event, [DONE]) rather than leaving them to be cut.
            await self.lifespan.shutdown()


if __name__ == "__main__":
    main()
