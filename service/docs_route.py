"""``/docs`` (Swagger UI) and ``/redoc`` with their scripts and styles served by this
service, so both pages work on a machine without internet access (FastAPI's own pages load
them from a CDN). The assets are the ones the ``fastapi-offline`` package ships; only its
files are used, not its app factory."""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from service.errors import ServiceError

ASSETS_PREFIX: Final = "/docs/assets"
# the only files served, with their content types: no path from the request reaches the disk
ASSETS: Final = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}

router = APIRouter(include_in_schema=False)


def _title(request: Request) -> str:
    return f"{request.app.title} API"


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title=_title(request),
        swagger_js_url=f"{ASSETS_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PREFIX}/favicon.png")


@router.get("/redoc", response_class=HTMLResponse)
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=request.app.openapi_url, title=_title(request),
        redoc_js_url=f"{ASSETS_PREFIX}/redoc.standalone.js",
        redoc_favicon_url=f"{ASSETS_PREFIX}/favicon.png", with_google_fonts=False)


@router.get(ASSETS_PREFIX + "/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ServiceError(f"no documentation asset {name!r}", 404, "not_found")
    body = (files("fastapi_offline") / "static" / name).read_bytes()
    return Response(body, media_type=ASSETS[name],
                    headers={"Cache-Control": "public, max-age=86400"})
