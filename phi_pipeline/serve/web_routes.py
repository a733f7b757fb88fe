"""/web/: the page that runs the bundle in the browser (phi_pipeline/web), beside the API. Static files only:
the model runs in the visitor's browser, not in this server."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response

from phi_pipeline.errors import UsageError
from phi_pipeline.web.site import ISOLATION_HEADERS, MEDIA_TYPES, site_files


def web_router(bundle: Path, api_key: str | None) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/web")
    async def web_root() -> RedirectResponse:
        return RedirectResponse("/web/")

    @router.get("/web/{path:path}")
    async def web_file(path: str) -> Response:
        if api_key is not None:
            # a browser cannot send the API key with a page load, and the page hands out the weights
            return PlainTextResponse("the in-browser page is off while the server has an API key: it serves the "
                                     "model's weights to anyone who can reach it (phi-pipeline web writes it as files)",
                                     status_code=404)
        try:
            files = site_files(bundle)  # per request: an adapter reload changes the bundle's manifest
        except UsageError as exc:
            return PlainTextResponse(str(exc) + "\n", status_code=404)
        file = files.get(path or "index.html")
        if file is None:
            return PlainTextResponse(f"/web/{path}: not a file of the page\n", status_code=404)
        return FileResponse(file, media_type=MEDIA_TYPES.get(file.suffix, "application/octet-stream"),
                            headers={**ISOLATION_HEADERS, "Cache-Control": "no-cache"})

    return router
