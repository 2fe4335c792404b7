"""The playground page at `/`: static HTML, CSS and JavaScript from server/static (no build step).

The page only calls the public API (GET /v1/models, POST /v1/generate with stream: true,
GET /metrics), so what it shows is what any client gets.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

# mounted at /static by create_app: the page's script, styles, vendored SSE parser and class names
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["playground"])


@router.get("/", response_class=FileResponse, include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")
