"""The chat page: static files from server/ui, served at / (off with --no-ui)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

UI_DIR = Path(__file__).resolve().parents[2] / "ui"
router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html")
