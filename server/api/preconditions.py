"""Conditional writes on the admin API: ETags are version numbers, If-Match / If-None-Match become
a store Precondition, and a failed one is a 412 that carries the current ETag so a client can
re-read and retry (optimistic concurrency between many writers of one store)."""

from __future__ import annotations

import re

from server.adapters.store import MAX_VERSION, Precondition, PreconditionFailed
from server.api.errors import APIError

ETAG = re.compile(r'(?:W/)?"([0-9]{1,9})"')
PRECONDITION_RESPONSES = {
    412: {
        "description": "If-Match / If-None-Match did not hold: nothing changed; the ETag header holds the "
        "current version (absent when the adapter does not exist)"
    }
}


def etag(version: int) -> str:
    return f'"{version}"'


def precondition(if_match: str | None, if_none_match: str | None = None) -> Precondition | None:
    """The Precondition the request's headers ask for; None when they ask for none."""
    if if_match is not None and if_none_match is not None:
        raise APIError(400, "give If-Match or If-None-Match, not both", param="If-Match")
    if if_none_match is not None:
        if if_none_match.strip() != "*":
            message = "If-None-Match: only * is supported (publish only if the name is new)"
            raise APIError(400, message, param="If-None-Match")
        return Precondition(exists=False)
    if if_match is None:
        return None
    value = if_match.strip()
    if value == "*":
        return Precondition(exists=True)
    match = ETAG.fullmatch(value)
    if match is None or not 1 <= int(match.group(1)) <= MAX_VERSION:
        raise APIError(
            400,
            f'If-Match: expected one ETag such as "3" (the version GET /v1/adapters/{{name}} returns) or *, '
            f"got {value[:80]!r}",
            param="If-Match",
        )
    return Precondition(version=int(match.group(1)))


def failed(error: PreconditionFailed, condition: Precondition) -> APIError:
    headers = {"ETag": etag(error.current)} if error.current is not None else None
    header = "If-None-Match" if condition.exists is False else "If-Match"
    return APIError(412, str(error), param=header, headers=headers)
