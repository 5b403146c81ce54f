"""ASGI middleware that checks the admin token before an admin request's body is read.

A route dependency would run only after FastAPI has parsed (and spooled to disk) the multipart
upload; refusing here means an unauthenticated 200 MB upload costs nothing but its headers.
"""

from __future__ import annotations

from server.api.deps import admin_refusal
from server.api.errors import error_response
from server.config import Settings


class AdminGate:
    def __init__(self, app, settings: Settings, path_prefixes: tuple[str, ...]):
        self.app = app
        self.settings = settings
        self.path_prefixes = path_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and any(_under(scope["path"], prefix) for prefix in self.path_prefixes):
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            refusal = admin_refusal(self.settings, authorization)
            if refusal is not None:
                response = error_response(refusal.status, refusal.message, refusal.param, refusal.headers)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")
