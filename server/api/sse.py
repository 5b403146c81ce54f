"""Server-sent events framing shared by the streaming routes."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Calls `on_end` once the response is over, however it ended. A client that left before the
    stream began has its events generator cancelled before it ever ran, so the generator's own
    cleanup (closing its requests) never runs: without this, those requests would hold their engine
    slot and adapter lease for good."""

    def __init__(self, events, on_end: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers=HEADERS)
        self.on_end = on_end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()
