"""``GET /v1/bank/report``: the served bank's offline report, read-only.

Only regular files directly inside ``<bank>/report`` with an allow-listed extension are
served (no sub-folders, no symbolic links, no hidden files), with their content type.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse

from service.errors import ServiceError
from service.runtime_state import RuntimeState
from service.schemas import ErrorResponse

router = APIRouter(tags=["v1"])

CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".json": "application/json",
}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def report_file(bank_path: Path, name: str) -> Path:
    """The file ``name`` of the bank's report folder, or a 404 ``ServiceError``."""
    missing = ServiceError(f"no report file {name!r}", 404, "not_found")
    suffix = Path(name).suffix.lower()
    if not _NAME.match(name) or ".." in name or suffix not in CONTENT_TYPES:
        raise missing
    folder = (bank_path / "report").resolve()
    path = folder / name
    try:
        st = path.lstat()
    except OSError:
        raise missing from None
    if not stat.S_ISREG(st.st_mode) or path.resolve().parent != folder:
        raise missing
    return path


def _serve(request: Request, name: str) -> FileResponse:
    state: RuntimeState = request.app.state.runtime_state
    path = report_file(state.require().bank.path, name)
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix.lower()],
                        headers={"Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})


@router.get("/v1/bank/report", summary="The bank's offline report (redirects to its page)",
            response_class=RedirectResponse, status_code=307,
            responses={503: {"model": ErrorResponse}})
async def bank_report(request: Request) -> RedirectResponse:
    """Redirects to ``/v1/bank/report/index.html`` (relative, so it works behind a path
    prefix) so that the page's relative links to its figures resolve."""
    state: RuntimeState = request.app.state.runtime_state
    report_file(state.require().bank.path, "index.html")  # 404 when the bank has none
    return RedirectResponse("report/index.html", status_code=307)


@router.get("/v1/bank/report/{name}", summary="A file of the bank's offline report",
            response_class=FileResponse,
            responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def bank_report_file(request: Request, name: str) -> FileResponse:
    return _serve(request, name)
