"""Operations routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

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
    if (runner_problem := engine.core.runner.problem()) is not None:
        problems.append(runner_problem)
    body = {
        "status": "ready" if not problems else "not ready",
        "model": state.model_name,
        "problems": problems,
        "requests_in_flight": engine.num_in_flight,
        "kv_cache_usage": round(engine.core.kv.usage(), 4),
    }
    return JSONResponse(body, status_code=200 if not problems else 503)


@router.get("/metrics")
async def metrics(state: State):
    """Prometheus metrics."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
