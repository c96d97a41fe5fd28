"""The chat page: the static files of server/ui, one route each, served at / (off with --no-ui).

One route per file, listed when this module is imported: the access layer matches exact paths,
so each file is open to all (the page asks for a key when the API wants one). Files are read
and gzipped once; `vendor/` holds third-party files in versioned folders, cached for a year.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response

UI_DIR = Path(__file__).resolve().parents[2] / "ui"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page loads nothing from elsewhere and runs no inline script, so Markdown from a model
# that slipped past the sanitiser still could not run code or call out (images: data: only).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}
REVALIDATE = "no-cache"  # kept, but checked against its ETag on each load
IMMUTABLE = "public, max-age=31536000, immutable"  # vendor/<name>-<version>/...

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class StaticFile:
    """One file of the page, held in memory as it is and gzipped."""

    body: bytes
    gzipped: bytes
    media_type: str
    etag: str
    cache_control: str
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def read(cls, path: Path) -> StaticFile:
        body = path.read_bytes()
        relative = path.relative_to(UI_DIR).as_posix()
        media_type = CONTENT_TYPES[path.suffix]
        return cls(body, gzip.compress(body, mtime=0), media_type,
                   f'"{hashlib.sha256(body).hexdigest()[:16]}"',
                   IMMUTABLE if relative.startswith("vendor/") else REVALIDATE,
                   tuple(PAGE_HEADERS.items()) if path.suffix == ".html" else ())

    def respond(self, request: Request) -> Response:
        headers = {"ETag": self.etag, "Cache-Control": self.cache_control,
                   "Vary": "Accept-Encoding", "X-Content-Type-Options": "nosniff",
                   **dict(self.headers)}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(self.gzipped, media_type=self.media_type,
                            headers={**headers, "Content-Encoding": "gzip"})
        return Response(self.body, media_type=self.media_type, headers=headers)


def url_path(path: Path) -> str:
    """The URL a file of server/ui is served at: index.html at /, the others by their path."""
    relative = path.relative_to(UI_DIR).as_posix()
    return "/" if relative == "index.html" else f"/{relative}"


def _add_route(path: Path) -> None:
    served = StaticFile.read(path)

    async def serve(request: Request) -> Response:
        return served.respond(request)

    router.add_api_route(url_path(path), serve, methods=["GET", "HEAD"])


for _file in sorted(UI_DIR.rglob("*")):
    if _file.is_file() and _file.suffix in CONTENT_TYPES:
        _add_route(_file)
