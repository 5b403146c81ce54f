"""ASGI middleware: a request id for every HTTP request (X-Request-ID, echoed back), one structured
access-log line when the response ends, and the last-resort 500 for errors nothing else handled.

The 500 is answered here, inside the request id's scope, so its log line carries the id; the error
is logged once and not re-raised, so the server (uvicorn) does not log its traceback a second time.
"""

from __future__ import annotations

import logging
import time
import uuid

from server.api.errors import error_response
from server.logging_setup import request_id

log = logging.getLogger("reft.access")
error_log = logging.getLogger("reft.errors")
QUIET_PATHS = ("/health", "/ready", "/metrics", "/version")


class RequestContext:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:128]
        rid = given or uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message):
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            error_log.exception("unhandled error")
            if not response_started:
                await error_response(500, "internal server error")(scope, receive, send_with_id)
        finally:
            if scope["path"] not in QUIET_PATHS or status >= 400:
                fields = {
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                }
                log.info("request", extra={"fields": fields})
            request_id.reset(token)
