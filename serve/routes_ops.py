"""Operations: the drop-an-image page at ``/`` and Prometheus ``/metrics`` (both open, no API key)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ganet.serve.app import StateDep
from ganet.serve.page import INDEX_HTML

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get("/", response_class=HTMLResponse, summary="A page to drop an image on and see the top classes")
async def index() -> HTMLResponse:
    return HTMLResponse(INDEX_HTML)


@router.get("/metrics", summary="Prometheus metrics (text exposition format)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
