"""Operations routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.adapters.fingerprint import FINGERPRINT_STATUSES
from server.api.deps import State

router = APIRouter(tags=["operations"])
STALE_ENGINE_SECONDS = 60.0  # a step longer than this means the engine is stuck


@router.get("/health")
async def health():
    """The process is alive."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State):
    """The model is loaded, the engine steps, and the server is not draining."""
    engine = state.engine
    problems = []
    if state.draining:
        problems.append("draining for shutdown")
    if not engine.accepting:
        problems.append("engine not running")
    elif time.monotonic() - engine.last_heartbeat > STALE_ENGINE_SECONDS:
        problems.append("engine has not stepped for over a minute")
    body = {
        "status": "ready" if not problems else "not ready",
        "model": state.model_name,
        "problems": problems,
        "requests_in_flight": engine.num_in_flight,
        "kv_cache_usage": round(engine.core.kv.usage(), 4),
        "adapters": _adapter_counts(state),
    }
    return JSONResponse(body, status_code=200 if not problems else 503)


def _adapter_counts(state: State) -> dict:
    """Stored adapters by base-model fingerprint: foreign ones are refused at load (unless allowed)."""
    counts = state.registry.fingerprint_counts()
    return {"stored": len(state.registry.catalog), **{status: counts[status] for status in FINGERPRINT_STATUSES}}


@router.get("/metrics")
async def metrics(state: State):
    """Prometheus metrics."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
