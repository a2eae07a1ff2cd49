"""The review page: `dreambatch api` serves a small web UI at /ui (plain HTML, JS and CSS shipped in the package,
jobs/api/ui/). The page itself is public and holds no data; everything it shows comes from the native API with the
API key the operator enters (kept in the browser tab's sessionStorage, sent as the Authorization header).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from jobs.api.service import ApiError

router = APIRouter(include_in_schema=False)
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# the page runs only its own script, talks only to this server, and is never framed
POLICY = "default-src 'self'; img-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


@router.get("/ui")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/{name}")
@router.get("/ui/", name="ui_index")
def ui_asset(name: str = "index.html") -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"no such page {name!r}; the review page is /ui/", code="not_found")
    body = files("jobs.api").joinpath("ui", name).read_bytes()
    return Response(
        body,
        media_type=ASSETS[name],
        headers={"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )
