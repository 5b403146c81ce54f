"""Operations routes: liveness, readiness, Prometheus metrics and the version.

Liveness (/health) fails only when restarting the process would help: the engine has died, or has not
reported for STALE_ENGINE_SECONDS (an idle loop reports too: idle or busy, it is stuck). Readiness
(/ready) also fails while loading or draining, when the process is healthy but should get no traffic."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.adapters.fingerprint import FINGERPRINT_STATUSES
from server.api.deps import State
from server.api.errors import error_response
from server.engine.async_engine import AsyncEngine

router = APIRouter(tags=["operations"])
STALE_ENGINE_SECONDS = 60.0  # the loop reports every step, and every 0.5 s when idle: this long without, it is stuck


def engine_stuck(engine: AsyncEngine, draining: bool) -> str | None:
    """Why the engine cannot make progress, or None. A stopped engine is expected while draining."""
    if not engine.alive and not draining:
        problem = engine.problem()
        return "the engine has stopped" + (f": {problem}" if problem else "")
    # idle too: a loop wedged while idle also fails readiness, so no traffic would ever make it busy
    if engine.alive and time.monotonic() - engine.last_heartbeat > STALE_ENGINE_SECONDS:
        return f"the engine has not reported for over {STALE_ENGINE_SECONDS:g} s"
    return None


@router.get("/health")
async def health(state: State):
    """The process is alive and its engine makes progress (503 when it does not: restart it)."""
    problem = engine_stuck(state.engine, state.draining)
    if problem is not None:
        return error_response(503, f"unhealthy: {problem}")
    return {"status": "ok"}


@router.get("/version")
async def server_version(request: Request):
    """The server's version (vLLM's GET /version)."""
    return {"version": request.app.version}


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
        problems.append("engine has not reported for over a minute")
    if (engine_problem := engine.problem()) is not None:
        problems.append(engine_problem)
    body = {
        "status": "ready" if not problems else "not ready",
        "model": state.model_name,
        "problems": problems,
        "requests_in_flight": engine.num_in_flight,
        "kv_cache_usage": round(engine.load().kv_usage, 4),
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
