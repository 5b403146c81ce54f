"""ASGI middleware that refuses oversized uploads before the multipart parser spools them.

A declared Content-Length over the limit gets 413 at once; a chunked body is counted as it
arrives and cut off with 413 when it crosses the limit.
"""

from __future__ import annotations

import json

from server.api.errors import error_body

MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries around the file


class UploadLimit:
    def __init__(self, app, limit_bytes: int, path_prefix: str):
        self.app = app
        self.limit = limit_bytes + MULTIPART_OVERHEAD
        self.path_prefix = path_prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(self.path_prefix):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        received = 0
        refused = answered = False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
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
                await self._refuse(send)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            if not answered:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(
            error_body(413, f"upload larger than the limit of {self.limit - MULTIPART_OVERHEAD} bytes")
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
