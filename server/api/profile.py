"""Operations route: the engine's next steps under torch.profiler, taken while it serves real traffic, for
an operator chasing where a step's time goes (server/engine/step_profiler.py writes the results). Off
unless REFT_PROFILE_DIR names a directory; behind the admin token, as the adapter routes are."""

from __future__ import annotations

import os
import time
import uuid

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from server.api.deps import State
from server.api.errors import APIError
from server.engine.async_engine import EngineStopped, ProfileBusy

PROFILE_PREFIX = "/v1/admin"
router = APIRouter(prefix=PROFILE_PREFIX, tags=["operations"])


class ProfileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # writing the timeline pauses the engine loop for about a second per 300 steps of a tiny model on a CPU,
    # several times that with Python's frames
    steps: int = Field(50, ge=1, le=1000, description="Engine steps to profile, from the next one that runs")
    with_stack: bool = Field(
        False,
        description="Record Python's frames too: the summary then gives the engine thread's Python time by function "
        "and where the host waited for the device; the profiled steps slow down more",
    )


class ProfileStarted(BaseModel):
    steps: int
    with_stack: bool
    summary: str = Field(description="Where the summary will be written: mean steps, top operators per step")
    trace: str = Field(description="Where the timeline will be written, for Perfetto or chrome://tracing")


@router.post("/profile", status_code=202, response_model=ProfileStarted)
async def profile(state: State, body: ProfileRequest | None = None):
    """Profile the engine's next steps; the files appear once they have run (the log says so). One profile
    at a time: 409 while one is being taken."""
    directory = state.settings.profile_dir
    if directory is None:
        raise APIError(404, "profiling is off: start the server with REFT_PROFILE_DIR (--profile-dir) set")
    body = body or ProfileRequest()
    stem = os.path.join(
        directory, f"reft-profile-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    )
    try:
        command = state.engine.profile(body.steps, stem, body.with_stack)
    except EngineStopped as e:
        raise APIError(503, str(e)) from None
    except ProfileBusy as e:
        raise APIError(409, str(e)) from None
    return ProfileStarted(steps=body.steps, with_stack=body.with_stack, summary=command.summary, trace=command.trace)
