"""POST /v1/admin/profile: the engine's next steps under torch.profiler, written as a summary (mean steps by
kind, top operators per step) and a timeline, while the server serves; off without REFT_PROFILE_DIR and
behind the admin token. (The engine process's variant is in test_core_process.py.)"""

import json
import logging
from pathlib import Path

import pytest
import torch

from server.engine.core import StepStats
from server.engine.core_loop import StepReport
from server.engine.profile_summary import top_events
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
    assert "steps only decoded" in text and "aten::mm" in text and "(schedule " in text
    assert json.loads(trace.read_text())["traceEvents"]
    assert not list(summary.parent.glob("*.part"))


def test_with_python_frames_the_summary_gives_python_time_by_function(client):
    started = client.post("/v1/admin/profile", json={"steps": 3, "with_stack": True}, headers=ADMIN)
    assert started.status_code == 202 and started.json()["with_stack"] is True
    body = {"prompt": "frames", "max_new_tokens": 6, "ignore_eos": True}
    assert client.post("/v1/generate", json=body).status_code == 200
    summary = Path(started.json()["summary"])
    wait_for(summary.exists, timeout=60)
    text = summary.read_text()
    assert "aten::mm" in text.split("Python's own time per step")[0]
    python = text.split("Python's own time per step")[1]
    assert "server/engine/" in python and " at 0x" not in python  # builtins named without their address


def test_no_body_takes_fifty_steps_and_bad_bodies_are_refused(client):
    started = client.post("/v1/admin/profile", headers=ADMIN)
    assert started.json()["steps"] == 50
    body = {"prompt": "fifty", "max_new_tokens": 60, "ignore_eos": True}
    assert client.post("/v1/generate", json=body).status_code == 200
    wait_for(Path(started.json()["summary"]).exists, timeout=30)
    for body in ({"steps": 0}, {"steps": 1001}, {"steps": 2, "extra": 1}, {"steps": 2, "with_stack": "often"}):
        refused = client.post("/v1/admin/profile", json=body, headers=ADMIN)
        assert refused.status_code in (400, 422) and error_of(refused)


def test_one_profile_at_a_time(client):
    first = client.post("/v1/admin/profile", json={"steps": 3}, headers=ADMIN)
    assert first.status_code == 202
    busy = client.post("/v1/admin/profile", json={"steps": 3}, headers=ADMIN)
    assert busy.status_code == 409 and "being taken" in error_of(busy)["message"]
    body = {"prompt": "busy", "max_new_tokens": 6, "ignore_eos": True}
    assert client.post("/v1/generate", json=body).status_code == 200
    wait_for(Path(first.json()["trace"]).exists, timeout=30)
    second = wait_for(
        lambda: (r := client.post("/v1/admin/profile", json={"steps": 1}, headers=ADMIN)).status_code == 202 and r
    )
    assert client.post("/v1/generate", json=body).status_code == 200
    wait_for(Path(second.json()["summary"]).exists, timeout=30)


def test_a_report_the_host_makes_itself_does_not_hold_profiling_up(client):
    """The engine process's host reports outputs of its own making (a command it could not send) with no
    profile count: a finished profile must not look unfinished after one."""
    engine = client.app.state.reft.engine
    first = client.post("/v1/admin/profile", json={"steps": 1}, headers=ADMIN)
    body = {"prompt": "count", "max_new_tokens": 3, "ignore_eos": True}
    assert client.post("/v1/generate", json=body).status_code == 200
    wait_for(Path(first.json()["trace"]).exists, timeout=30)
    wait_for(lambda: engine._profiles_done == engine._profiles_sent, timeout=30)
    engine._on_report(StepReport([], engine.load()))
    second = client.post("/v1/admin/profile", json={"steps": 1}, headers=ADMIN)
    assert second.status_code == 202, second.text
    assert client.post("/v1/generate", json=body).status_code == 200
    wait_for(Path(second.json()["summary"]).exists, timeout=30)


def test_it_needs_the_admin_token(client):
    refused = client.post("/v1/admin/profile", json={"steps": 2})
    assert refused.status_code == 401 and "admin token" in error_of(refused)["message"]


def test_it_is_off_without_a_directory(tmp_path):
    with running_app(FIXTURE / "model", tmp_path) as client:
        refused = client.post("/v1/admin/profile", json={"steps": 2}, headers=ADMIN)
    assert refused.status_code == 404 and "REFT_PROFILE_DIR" in error_of(refused)["message"]


def steps(count, prefill_tokens=0):
    return [StepStats(8, 2, prefill_tokens, 0.01, 0.0) for _ in range(count)]


def test_a_session_open_when_the_loop_ends_is_written_and_the_profiler_let_go(tmp_path):
    profiler = StepProfiler()
    profiler.start(ProfileSteps(100, str(tmp_path / "cut-short")))
    assert torch.autograd.profiler._is_profiler_enabled
    for stats in steps(1, prefill_tokens=6) + steps(2):
        profiler.stepped(stats)
    profiler.close()
    assert not torch.autograd.profiler._is_profiler_enabled and profiler.done == 1
    summary = wait_for(lambda: (tmp_path / "cut-short.txt").exists() and (tmp_path / "cut-short.txt"), timeout=30)
    assert "3 engine steps" in summary.read_text() and "1 steps prefilled" in summary.read_text()


def test_a_second_command_is_dropped_and_a_failed_write_only_logs(tmp_path, caplog):
    profiler = StepProfiler()
    profiler.start(ProfileSteps(1, str(tmp_path / "first")))
    with caplog.at_level(logging.WARNING):
        profiler.start(ProfileSteps(1, str(tmp_path / "second")))
    assert "dropped" in caplog.text and profiler.done == 1
    profiler.stepped(steps(1)[0])
    assert profiler.done == 2 and (tmp_path / "first.trace.json").exists()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    profiler.start(ProfileSteps(1, str(blocked / "under-a-file")))  # its directory cannot be made
    with caplog.at_level(logging.ERROR):
        profiler.stepped(steps(1)[0])
    assert "writing the profile" in caplog.text and profiler.done == 3
    profiler.stepped(steps(1)[0])  # no session: nothing happens
    assert profiler.done == 3


def test_host_self_times_subtract_what_each_operator_called():
    """One thread: linear (10 us) calls mm (6 us), which calls a kernel launch (2 us); a kernel runs 5 us."""
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "pid": 1, "tid": 1, "ts": 0, "dur": 10},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 2, "dur": 6},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 1, "ts": 3, "dur": 2},
        {"ph": "X", "cat": "cpu_op", "name": "aten::relu", "pid": 1, "tid": 2, "ts": 4, "dur": 3},
        {"ph": "X", "cat": "kernel", "name": "gemm", "pid": 0, "tid": 7, "ts": 5, "dur": 5},
        {"ph": "i", "name": "marker", "pid": 1, "tid": 1, "ts": 1},
    ]
    ops = top_events(events, steps=1)
    host = {op["name"]: op["ms"] * 1000 for op in ops["host"]}
    assert host == pytest.approx({"aten::linear": 4, "aten::mm": 4, "cudaLaunchKernel": 2, "aten::relu": 3})
    assert [(op["name"], op["ms"] * 1000) for op in ops["device"]] == [("gemm", pytest.approx(5))]


def test_python_time_is_the_stepping_threads_and_waits_name_the_function_that_waited():
    """Thread 1 steps: a function (20 us) calls a builtin (10 us) around an operator (8 us) that waits for the
    device (6 us). Thread 2 waits on its queue the whole time."""
    events = [
        {
            "ph": "X",
            "cat": "python_function",
            "name": "server/engine/core.py(10): step",
            "pid": 1,
            "tid": 1,
            "ts": 0,
            "dur": 20,
        },
        {
            "ph": "X",
            "cat": "python_function",
            "name": "<built-in method item of Tensor object at 0x7f00>",
            "pid": 1,
            "tid": 1,
            "ts": 4,
            "dur": 10,
        },
        {"ph": "X", "cat": "cpu_op", "name": "aten::item", "pid": 1, "tid": 1, "ts": 5, "dur": 8},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "pid": 1, "tid": 1, "ts": 6, "dur": 6},
        {
            "ph": "X",
            "cat": "python_function",
            "name": "<built-in method get of _queue.SimpleQueue object at 0x1>",
            "pid": 1,
            "tid": 2,
            "ts": 0,
            "dur": 50,
        },
    ]
    ops = top_events(events, steps=2, thread=1)
    in_us = {side: {op["name"]: op["ms"] * 2000 for op in ops[side]} for side in ("host", "python", "waits")}
    assert in_us["python"] == pytest.approx(
        {"server/engine/core.py(10): step": 10, "<built-in method item of Tensor object>": 2}
    )
    assert in_us["host"] == pytest.approx({"aten::item": 2, "cudaStreamSynchronize": 6})
    assert in_us["waits"] == pytest.approx({"cudaStreamSynchronize in server/engine/core.py(10): step": 6})
    everyone = {op["name"] for op in top_events(events, steps=1)["python"]}
    assert "<built-in method get of _queue.SimpleQueue object>" in everyone
