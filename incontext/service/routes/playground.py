"""The pages a person opens: the playground at `/` and the API reference at `/docs` (Swagger
UI) and `/redoc`, every asset served from the package, so they work on a host with no
network. The playground is plain HTML, CSS and JS in service/static/playground/; Swagger
UI's and ReDoc's files come from the `fastapi-offline` package (MIT), which ships them."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PLAYGROUND = STATIC_DIR / "playground"
VENDOR = "/static/vendor"
TITLE = "incontext API"

router = APIRouter(include_in_schema=False)

# The pages may load nothing from elsewhere: ReDoc's footer, for one, asks a CDN for its logo.
# (Inline scripts: FastAPI's pages start Swagger UI and ReDoc with one; ReDoc runs a worker.)
SELF_ONLY = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; font-src 'self' data:",
}


@router.get("/")
def playground() -> FileResponse:
    # Images may come from anywhere: an image_url the user typed is shown before it is sent.
    policy = SELF_ONLY["Content-Security-Policy"].replace("img-src 'self'", "img-src *")
    return FileResponse(PLAYGROUND / "index.html", headers={"Cache-Control": "no-cache", "Content-Security-Policy": policy})


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url="/openapi.json", title=TITLE, swagger_js_url=f"{VENDOR}/swagger-ui-bundle.js",
        swagger_css_url=f"{VENDOR}/swagger-ui.css", swagger_favicon_url=f"{VENDOR}/favicon.png",
    )
    page.headers.update(SELF_ONLY)
    return page


@router.get("/redoc")
def redoc() -> HTMLResponse:
    page = get_redoc_html(
        openapi_url="/openapi.json", title=TITLE, redoc_js_url=f"{VENDOR}/redoc.standalone.js",
        redoc_favicon_url=f"{VENDOR}/favicon.png", with_google_fonts=False,
    )
    page.headers.update(SELF_ONLY)
    return page


def install(app: FastAPI) -> None:
    """The pages' routes and their static files (create the app with docs_url=None and
    redoc_url=None: FastAPI's own pages load their assets from a CDN)."""
    app.include_router(router)
    app.mount(VENDOR, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="vendor")
    app.mount("/static/playground", StaticFiles(directory=str(PLAYGROUND)), name="playground")
