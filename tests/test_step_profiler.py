"""POST /v1/admin/profile: the engine's next steps under torch.profiler, written as a summary (mean steps by
kind, top operators per step) and a timeline, while the server serves; off without REFT_PROFILE_DIR and
behind the admin token. (The engine process's variant is in test_core_process.py.)"""

import json
import logging
from pathlib import Path

import pytest

from server.engine.core import StepStats
from server.engine.step_profiler import ProfileSteps, StepProfiler
from tests.api_utils import ADMIN, error_of, running_app, wait_for
from tests.conftest import FIXTURE


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    store, profiles = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("profiles")
    with running_app(FIXTURE / "model", store, profile_dir=str(profiles)) as client:
        yield client


def test_the_next_steps_are_profiled_while_requests_run(client):
    started = client.post("/v1/admin/profile", json={"steps": 4}, headers=ADMIN)
    assert started.status_code == 202, started.text
    assert started.json()["steps"] == 4
    summary, trace = Path(started.json()["summary"]), Path(started.json()["trace"])
    for prompt in ("one", "two"):
        body = {"prompt": prompt, "max_new_tokens": 6, "ignore_eos": True}
        assert client.post("/v1/generate", json=body).status_code == 200
    wait_for(summary.exists, timeout=30)  # written last
    text = summary.read_text()
    assert "4 engine steps under torch.profiler" in text and "steps prefilled" in text
    assert "steps only decoded" in text and "aten::mm" in text
    assert json.loads(trace.read_text())["traceEvents"]
    assert not list(summary.parent.glob("*.part"))


def test_no_body_takes_fifty_steps_and_bad_bodies_are_refused(client):
    assert client.post("/v1/admin/profile", headers=ADMIN).json()["steps"] == 50
    for body in ({"steps": 0}, {"steps": 10_001}, {"steps": 2, "extra": 1}):
        refused = client.post("/v1/admin/profile", json=body, headers=ADMIN)
        assert refused.status_code in (400, 422) and error_of(refused)


def test_it_needs_the_admin_token(client):
    refused = client.post("/v1/admin/profile", json={"steps": 2})
    assert refused.status_code == 401 and "admin token" in error_of(refused)["message"]


def test_it_is_off_without_a_directory(tmp_path):
    with running_app(FIXTURE / "model", tmp_path) as client:
        refused = client.post("/v1/admin/profile", json={"steps": 2}, headers=ADMIN)
    assert refused.status_code == 404 and "REFT_PROFILE_DIR" in error_of(refused)["message"]


def steps(count, prefill_tokens=0):
    return [StepStats(8, 2, prefill_tokens, 0.01, 0.0) for _ in range(count)]


def test_one_session_at_a_time_and_a_failed_write_only_logs(tmp_path, caplog):
    profiler = StepProfiler()
    profiler.start(ProfileSteps(2, str(tmp_path / "first")))
    with caplog.at_level(logging.WARNING):
        profiler.start(ProfileSteps(2, str(tmp_path / "second")))
    assert "ignored" in caplog.text
    for stats in steps(1, prefill_tokens=6) + steps(1):
        profiler.stepped(stats)
    assert (tmp_path / "first.txt").exists() and not (tmp_path / "second.txt").exists()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    profiler.start(ProfileSteps(1, str(blocked / "under-a-file")))  # its directory cannot be made
    with caplog.at_level(logging.ERROR):
        profiler.stepped(steps(1)[0])
    assert "writing the profile" in caplog.text
    profiler.stepped(steps(1)[0])  # the session is over: nothing happens
