"""Shared application state and the FastAPI dependencies that guard routes."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.api.errors import APIError
from server.api.token_texts import TokenTexts
from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.grammar import Grammars
from server.metrics import Metrics
from server.model_facts import ModelFacts

CHARS_PER_CONTEXT_TOKEN = 16


@dataclass
class AppState:
    settings: Settings
    model_name: str
    model: ModelFacts  # wherever the engine runs
    tokenizer: object
    engine: AsyncEngine
    store: AdapterStore
    registry: AdapterRegistry
    metrics: Metrics
    grammars: Grammars | None  # the engine's structured outputs, which requests' grammars are checked against
    draining_since: float | None = None  # monotonic time of SIGTERM (or of the shutdown)
    token_texts: TokenTexts = field(init=False)  # each token's text alone, for logprobs

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.tokenizer)

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def begin_draining(self) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def grace_left(self) -> float:
        """What remains of the shutdown grace period: the HTTP drain and the engine drain share it."""
        spent = time.monotonic() - self.draining_since if self.draining_since is not None else 0.0
        return max(0.0, self.settings.shutdown_grace - spent)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_prompt_chars(self) -> int:
        """Prompt characters accepted before tokenizing: the setting, or 16 per context token
        (real tokenizers average 3 to 5 characters a token; the margin only refuses absurd prompts)."""
        return self.settings.max_prompt_chars or CHARS_PER_CONTEXT_TOKEN * self.max_model_len

    @property
    def max_prompts(self) -> int:
        """Prompts one /v1/completions call may submit: never more than the engine can hold at once."""
        return min(self.settings.max_prompts, self.engine.max_in_flight)


def get_state(request: Request) -> AppState:
    return request.app.state.reft


State = Annotated[AppState, Depends(get_state)]


def _bearer(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def require_api_key(request: Request, state: State) -> None:
    """Generation routes: a bearer token when REFT_API_KEY is set."""
    key = state.settings.api_key
    if key is not None and not _matches(_bearer(request.headers.get("authorization", "")), key.get_secret_value()):
        raise APIError(
            401, "missing or invalid API key (Authorization: Bearer <key>)", headers={"WWW-Authenticate": "Bearer"}
        )


def admin_refusal(settings: Settings, authorization: str) -> APIError | None:
    """Why a request with this Authorization header may not use the admin API; None when it may.
    The admin API is closed without a token unless explicitly opened."""
    token = settings.admin_token
    if token is None:
        if settings.admin_open:
            return None
        return APIError(403, "the admin API is disabled: set REFT_ADMIN_TOKEN (or --admin-open for local use)")
    if not _matches(_bearer(authorization), token.get_secret_value()):
        return APIError(
            401,
            "missing or invalid admin token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None
