"""ASGI middleware that bounds every request body before any route, parser or spool sees it.

Each path prefix has its own limit (adapter uploads are large, generation bodies small); other
paths get the default. A declared Content-Length over the limit gets 413 at once, without reading
the body; a chunked body is counted as it arrives and cut off with 413 when it crosses the limit.
"""

from __future__ import annotations

import json

from server.api.errors import error_body

MULTIPART_OVERHEAD = 64 * 1024  # an upload's form fields and boundaries around the file


class BodyLimit:
    def __init__(self, app, default_limit: int, limits_by_prefix: dict[str, int]):
        self.app = app
        self.default_limit = default_limit
        self.limits_by_prefix = limits_by_prefix

    def limit_for(self, path: str) -> int:
        return next(
            (limit for prefix, limit in self.limits_by_prefix.items() if path.startswith(prefix)), self.default_limit
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _refuse(send, limit)
        received = 0
        refused = answered = False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise _TooLarge
            return message

        async def guarded_send(message):
            # once refused, whatever the app answers (its parser turns our exception into a 400) becomes a 413
            nonlocal answered
            if not refused:
                await send(message)
            elif message["type"] == "http.response.start" and not answered:
                answered = True
                await _refuse(send, limit)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            if not answered:
                await _refuse(send, limit)


async def _refuse(send, limit: int) -> None:
    body = json.dumps(error_body(413, f"request body larger than the limit of {limit} bytes")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
