"""The search page and thumbnails: a FastAPI app the service mounts at /ui (service/static/)."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from service.settings import UI_PATH

STATIC_DIR = Path(__file__).resolve().parent / "static"

ui_app = FastAPI(title="Marketplace search page", docs_url=None, redoc_url=None, openapi_url=None)
ui_app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


@ui_app.get("/index.html", include_in_schema=False)
def _index_alias() -> RedirectResponse:
    return RedirectResponse(url=f"{UI_PATH}/")
