"""The engine core in a process of its own (`--engine-core process`, the GPU default), run here on the
CPU: the same tokens as pyreft through the pipe, adapters sent once and dropped over budget (and sent
again when the engine process could not take them, or they could not be sent), metrics and probes fed
by the process's reports, and an engine process that dies, cannot load or crashes while loading
reported, not hung on."""

import json
import os
import queue
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from server.adapters.format import AdapterFile
from server.adapters.materialize import materialize
from server.adapters.pyreft import import_pyreft
from server.app import engine_core_in_process
from server.config import Settings
from server.distributed.adapter_mirror import AdapterReceiver, AdapterSender
from server.engine.core_loop import Refuse, Submit
from server.engine.sampling_params import SamplingParams
from server.engine_process import (
    AdapterRef,
    CoreProcess,
    EngineProcessFailed,
    LostAdapter,
    WireSubmit,
    _with_adapter,
)
from server.model_load_errors import ModelLoadError
from tests.api_utils import ADMIN, error_of, running_app, sse_events, upload, wait_for
from tests.conftest import FIXTURE

EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
MAX_NEW = EXPECTED["max_new_tokens"]
ADAPTERS = {  # fixture checkpoint -> (served name, positions)
    "lo_l14_f3l3_unshared": ("lo14", "f3+l3"),
    "di_l13_f1l2_unshared": ("di", "f1+l2"),
}


def pyreft_adapter(checkpoint: str) -> bytes:
    _, positions = ADAPTERS[checkpoint]
    return import_pyreft(FIXTURE / "adapters" / checkpoint, positions=positions, share_weights=False).to_bytes()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # one resident adapter: the engine process is told to drop one whenever the other is sent
    store = tmp_path_factory.mktemp("store")
    profiles = tmp_path_factory.mktemp("profiles")
    options = {"engine_core": "process", "device": "cpu", "max_resident_adapters": 1, "profile_dir": str(profiles)}
    with running_app(FIXTURE / "model", store, **options) as client:
        for checkpoint, (name, _) in ADAPTERS.items():
            assert upload(client, name, pyreft_adapter(checkpoint)).status_code == 201
        yield client


def generate(client, **body):
    response = client.post("/v1/generate", json={"max_new_tokens": MAX_NEW, "ignore_eos": True, **body})
    assert response.status_code == 200, response.text
    return response.json()["token_ids"]


def test_the_engine_runs_in_another_process(client):
    host = client.app.state.reft.engine.host
    assert host.process.pid != os.getpid() and host.process.is_alive()


def test_tokens_equal_pyreft_in_mixed_batches_through_the_pipe(client):
    by_adapter = {
        name: [c for c in EXPECTED["cases"] if c["adapter"] == checkpoint] for checkpoint, (name, _) in ADAPTERS.items()
    }
    jobs = []
    for pair in zip(*by_adapter.values(), strict=False):  # alternating: each adapter is sent, dropped, sent again
        for name, case in zip(by_adapter, pair, strict=True):
            jobs.append(({"prompt": case["prompt"], "adapter": name}, case["adapter_tokens"]))
            jobs.append(({"prompt": case["prompt"]}, case["base_tokens"]))
    with ThreadPoolExecutor(8) as pool:  # concurrent: adapters and base share steps
        served = list(pool.map(lambda job: generate(client, **job[0]), jobs))
    assert served == [expected for _, expected in jobs]


def test_a_new_version_reaches_the_engine_process(client):
    lo, di = (next(c for c in EXPECTED["cases"] if c["adapter"] == name) for name in ADAPTERS)
    assert upload(client, "swap", pyreft_adapter("di_l13_f1l2_unshared")).status_code == 201
    assert generate(client, prompt=di["prompt"], adapter="swap") == di["adapter_tokens"]
    assert upload(client, "swap", pyreft_adapter("lo_l14_f3l3_unshared")).status_code == 201
    assert generate(client, prompt=lo["prompt"], adapter="swap") == lo["adapter_tokens"]


def test_metrics_and_probes_come_from_the_engine_process(client):
    generate(client, prompt="metrics", max_new_tokens=3)
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
    text = client.get("/metrics").text
    steps = [line for line in text.splitlines() if line.startswith("reft_step_duration_seconds_count")]
    assert sum(float(line.split()[-1]) for line in steps) > 0
    assert "reft_kv_cache_usage_ratio" in text


def test_the_engine_process_profiles_its_next_steps(client):
    """With Python's frames: the summary counts the Python time of the engine process's stepping thread."""
    started = client.post("/v1/admin/profile", json={"steps": 2, "with_stack": True}, headers=ADMIN)
    assert started.status_code == 202, started.text
    generate(client, prompt="profile me", max_new_tokens=6)
    summary, trace = Path(started.json()["summary"]), Path(started.json()["trace"])
    wait_for(summary.exists, timeout=60)  # written last
    text = summary.read_text()
    assert "2 engine steps under torch.profiler" in text
    assert "server/engine/" in text.split("Python's own time per step")[1]
    assert json.loads(trace.read_text())["traceEvents"]


def test_a_dead_engine_process_fails_its_requests_and_the_probes(tmp_path):
    with running_app(FIXTURE / "model", tmp_path, engine_core="process", device="cpu") as client:
        body = {"prompt": "a long one", "max_new_tokens": 490, "ignore_eos": True}  # the window: 512
        with ThreadPoolExecutor() as pool:
            unstreamed = pool.submit(client.post, "/v1/generate", json=body)
            with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
                events = sse_events(response.iter_lines())
                assert next(events)["token_ids"]  # generating
                assert not unstreamed.done()
                os.kill(client.app.state.reft.engine.host.process.pid, signal.SIGKILL)
                last = [event for event in events if event != "[DONE]"][-1]
        assert "engine process exited with code -9" in last["error"]["message"] and last["error"]["code"] == 503
        answer = unstreamed.result()  # not the request's fault: 503, so that a client retries it elsewhere
        assert answer.status_code == 503 and "engine process exited" in error_of(answer)["message"]
        deadline = time.monotonic() + 10
        while (health := client.get("/health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health.status_code == 503 and "engine process exited" in error_of(health)["message"]
        assert client.get("/ready").status_code == 503
        refused = client.post("/v1/generate", json={"prompt": "after", "max_new_tokens": 2})
        assert refused.status_code == 503 and "engine process exited" in error_of(refused)["message"], "and says why"


def test_an_engine_process_that_cannot_load_its_model_fails_the_start_with_why(tmp_path):
    """The mistake crosses the pipe as it is, for main() to say in one line."""
    with pytest.raises(ModelLoadError, match=f"--model {tmp_path / 'no-such-model'}: cannot load it: "):
        with running_app(tmp_path / "no-such-model", tmp_path, engine_core="process", device="cpu"):
            pass


def test_where_the_core_runs():
    assert engine_core_in_process(Settings(engine_core="process"), model_given=False)
    assert not engine_core_in_process(Settings(engine_core="thread", device="cuda"), model_given=False)
    assert not engine_core_in_process(Settings(engine_core="auto", device="cpu"), model_given=False)
    assert not engine_core_in_process(Settings(engine_core="auto", device="cuda"), model_given=True)
    assert not engine_core_in_process(Settings(engine_core="auto", device="cuda", tensor_parallel=2), model_given=False)
    with pytest.raises(ValueError, match="tensor parallelism"):
        engine_core_in_process(Settings(engine_core="process", tensor_parallel=2), model_given=False)


def test_the_engine_process_ignores_sigterm_the_server_drains_first(client):
    process = client.app.state.reft.engine.host.process
    os.kill(process.pid, signal.SIGTERM)  # as a process-group signal or a container runtime may send
    assert generate(client, prompt="still here", max_new_tokens=3) and process.is_alive()


CRASHING_PLUGIN = """
import multiprocessing, os
if multiprocessing.parent_process() is not None:  # only in the engine process
    os._exit(3)
"""


FAILING_PLUGIN = """
import multiprocessing
if multiprocessing.parent_process() is not None:  # only in the engine process
    raise RuntimeError("a bug")
"""


@pytest.mark.parametrize(
    "plugin, failure",
    [(FAILING_PLUGIN, "could not start: .*RuntimeError: a bug"), (CRASHING_PLUGIN, "exited with code 3 at start-up")],
    ids=["raises", "dies"],
)
def test_an_engine_process_that_fails_while_loading_fails_the_start(tmp_path, monkeypatch, plugin, failure):
    (tmp_path / "in_engine.py").write_text(plugin)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned processes start from this sys.path
    settings = Settings(model=str(FIXTURE / "model"), device="cpu", engine_core="process", plugins="in_engine")
    with pytest.raises(EngineProcessFailed, match=failure):
        CoreProcess(settings, str(FIXTURE / "model"))


def test_an_adapter_whose_command_could_not_be_sent_goes_with_the_next(client, monkeypatch):
    lo, di = (next(c for c in EXPECTED["cases"] if c["adapter"] == name) for name in ADAPTERS)
    assert generate(client, prompt=lo["prompt"], adapter="lo14") == lo["adapter_tokens"]  # lo14 is resident
    commands = client.app.state.reft.engine.host._commands
    failures = [MemoryError("no room to send the adapter's tensors")]

    def send_bytes_failing_once(data, send_bytes=commands.send_bytes):
        if failures:
            raise failures.pop()
        return send_bytes(data)

    monkeypatch.setattr(commands, "send_bytes", send_bytes_failing_once)
    body = {"prompt": di["prompt"], "adapter": "di", "max_new_tokens": MAX_NEW, "ignore_eos": True}
    failed = client.post("/v1/generate", json=body)
    assert failed.status_code != 200 and "not sent" in failed.text, failed.text
    # neither di's tensors nor the order to drop lo14 reached the engine process: the next request sends both
    assert generate(client, prompt=di["prompt"], adapter="di") == di["adapter_tokens"]


def test_an_adapter_the_engine_process_cannot_take_is_refused_and_sent_again():
    adapter = materialize(AdapterFile.from_bytes(pyreft_adapter("di_l13_f1l2_unshared")), name="di", version=1)
    sender, reports = AdapterSender(2**30, 8), queue.SimpleQueue()
    new, dropped = sender.update({adapter.digest: adapter})
    wire = WireSubmit(Submit("r1", [1, 2, 3], SamplingParams()), AdapterRef(adapter.digest, "di", 1), new, dropped)

    def out_of_memory(*_):
        raise RuntimeError("out of memory")

    broken = AdapterReceiver(torch.float32, torch.device("cpu"))
    broken.receive = out_of_memory  # as materializing on a full GPU would
    refused = _with_adapter(wire, broken, reports)
    assert isinstance(refused, Refuse) and "out of memory" in refused.error
    lost = reports.get_nowait()
    assert lost == LostAdapter(adapter.digest)
    sender.forget(lost.digest)  # what the server's command thread does with the notice
    assert adapter.digest in sender.update({adapter.digest: adapter})[0]  # the tensors travel again

    receiver = AdapterReceiver(torch.float32, torch.device("cpu"))
    alias = WireSubmit(wire.submit, AdapterRef(adapter.digest, "alias", 7), new, [])
    submit = _with_adapter(alias, receiver, reports)
    assert (submit.adapter.name, submit.adapter.version) == ("alias", 7)  # the copy is shared, the name is not
