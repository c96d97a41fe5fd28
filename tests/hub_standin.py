"""A local stand-in for the Hugging Face Hub's file API (`HF_ENDPOINT`), for download tests.

It serves `/{repo}/resolve/{revision}/{file}` as the Hub does for LFS files (ETag = SHA-256,
Range requests for resumes) and can misbehave on purpose: cut a transfer short, serve corrupt
bytes, or go slowly. It records every request so tests can see the resumes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Behaviour:
    cut_after: int | None = None  # close the connection after this many body bytes...
    cuts: int = 1  # ...this many times (then serve normally)
    corrupt: bool = False  # flip bytes (same length; the ETag stays the true SHA-256)
    chunk_delay: float = 0.0  # seconds between 64 KiB chunks


@dataclass
class HubStandIn:
    files: dict[str, bytes]  # "org/repo/file" -> content
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, range

    def __post_init__(self) -> None:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_HEAD(self) -> None:
                standin.serve(self, body=False)

            def do_GET(self) -> None:
                standin.serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        wanted = handler.headers.get("Range", "")
        self.requests.append((handler.command, handler.path, wanted))
        repo_and_rest = handler.path.split("?")[0].lstrip("/").split("/resolve/", 1)
        content = None
        if len(repo_and_rest) == 2:
            _, _, name = repo_and_rest[1].partition("/")
            content = self.files.get(f"{repo_and_rest[0]}/{name}")
        if content is None:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted else 0
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(len(content) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        handler.end_headers()
        if body:
            self._send_body(handler, content, start)

    def _send_body(self, handler: BaseHTTPRequestHandler, content: bytes, start: int) -> None:
        b = self.behaviour
        data = bytes(x ^ 0xFF for x in content) if b.corrupt else content
        limit = len(data)
        if b.cut_after is not None and b.cuts > 0:
            b.cuts -= 1
            limit = min(limit, start + b.cut_after)
        for offset in range(start, limit, 1 << 16):
            handler.wfile.write(data[offset:min(offset + (1 << 16), limit)])
            handler.wfile.flush()
            time.sleep(b.chunk_delay)
        if limit < len(data):
            handler.close_connection = True
            handler.connection.close()
