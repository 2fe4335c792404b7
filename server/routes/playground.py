"""The playground page at `/`: static HTML, CSS and JavaScript from server/static (no build step).

The page only calls the public API (GET /v1/models, POST /v1/generate with stream: true,
GET /metrics), so what it shows is what any client gets.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# a route rather than app.mount: metrics see one route template, and a 404 gets the API's error body
_static_files = StaticFiles(directory=STATIC_DIR)

router = APIRouter(tags=["playground"])


# HEAD too (`curl -I`), as the probes take it (routes/health.py): StaticFiles sends headers only, and answers a
# browser's If-None-Match with 304, for the page as for its files
@router.get("/", response_class=FileResponse, include_in_schema=False)
@router.head("/", include_in_schema=False)
async def playground(request: Request) -> Response:
    return await _static_files.get_response("index.html", request.scope)


@router.get("/static/{path:path}", include_in_schema=False)
@router.head("/static/{path:path}", include_in_schema=False)
async def static_file(path: str, request: Request) -> Response:
    """The page's script, styles, vendored SSE parser and class names (StaticFiles keeps to STATIC_DIR)."""
    return await _static_files.get_response(path, request.scope)
