"""End to end against real server processes on loopback: the official openai client, client
disconnects, SIGTERM drain, two replicas sharing one store, and a publish killed with SIGKILL. The
server's tests run with the engine core in a thread and in a process of its own."""

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from bench.load import LoadSpec, run_load
from server.adapters.format import AdapterFile
from server.adapters.random_adapters import random_adapter_file
from server.adapters.store import AdapterStore
from tests.api_utils import ADMIN, ADMIN_TOKEN, sse_events, wait_for
from tests.server_process import ServerProcess

HIDDEN = 128  # the tiny Llama
SERVE_ARGS = ("--kv-cache-memory", "32MiB", "--max-model-len", "512", "--admin-token", ADMIN_TOKEN)
ENGINE_CORES = ("thread", "process")  # the CPU default, and the GPU default run here on the CPU


def adapter_bytes(seed: int) -> bytes:
    return random_adapter_file("loreft", (0, 2), 4, "f2+l2", HIDDEN, seed=seed).to_bytes()


def upload(url: str, name: str, data: bytes) -> dict:
    response = httpx.post(f"{url}/v1/adapters/{name}", files={"file": ("a.safetensors", data)}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module", params=ENGINE_CORES)
def engine_core(request):
    return request.param


@pytest.fixture(scope="module")
def store(tmp_path_factory, engine_core):
    return tmp_path_factory.mktemp(f"shared-store-{engine_core}")


@pytest.fixture(scope="module")
def server(tiny_model_dir, store, tmp_path_factory, engine_core):
    model = tiny_model_dir("llama")
    log = tmp_path_factory.mktemp("logs") / "a.log"
    process = ServerProcess(
        log, "--model", str(model), "--store", str(store), "--engine-core", engine_core, *SERVE_ARGS
    )
    upload(process.url, "steer", adapter_bytes(1))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def replica(tiny_model_dir, store, tmp_path_factory):
    """A second server on `server`'s store, as a second replica of a deployment: it syncs every 0.5 s."""
    log = tmp_path_factory.mktemp("logs") / "b.log"
    args = ("--model", str(tiny_model_dir("llama")), "--store", str(store), "--store-sync-interval", "0.5")
    process = ServerProcess(log, *args, *SERVE_ARGS)
    yield process
    process.stop()


def test_openai_client_completions_chat_streaming_and_adapters(server, tiny_model_dir):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    base_name = tiny_model_dir("llama").name
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == base_name and "steer" in ids

    def complete(model, **kw):
        return client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0, **kw)

    base, steered = complete(base_name), complete("steer")
    native = httpx.post(
        f"{server.url}/v1/generate", json={"prompt": "Once upon a time", "adapter": "steer", "max_new_tokens": 12}
    ).json()
    assert steered.choices[0].text == native["text"]
    assert (
        native["token_ids"]
        != httpx.post(f"{server.url}/v1/generate", json={"prompt": "Once upon a time", "max_new_tokens": 12}).json()[
            "token_ids"
        ]
    )
    assert base.usage.completion_tokens <= 12
    streamed = "".join(chunk.choices[0].text for chunk in complete("steer", stream=True))
    assert streamed == steered.choices[0].text

    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(model="steer", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(
            model="steer",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    with pytest.raises(openai.NotFoundError):
        complete("no-such-adapter")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=base_name, prompt="x", max_tokens=5, n=3, best_of=4)

    # n choices: each index's stream starts with the assistant's role, and equals the choice made whole
    sampled = {"model": "steer", "messages": messages, "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 2}
    whole = client.chat.completions.create(**sampled)
    assert [c.index for c in whole.choices] == [0, 1] and whole.usage.prompt_tokens == chat.usage.prompt_tokens
    texts, roles = ["", ""], [[], []]
    for event in client.chat.completions.create(**sampled, stream=True):
        for choice in event.choices:
            texts[choice.index] += choice.delta.content or ""
            roles[choice.index].append(choice.delta.role)
    assert texts == [c.message.content for c in whole.choices]
    assert all(r[0] == "assistant" and not any(r[1:]) for r in roles)


def test_client_disconnect_cancels_the_request_and_frees_its_blocks(server):
    body = {"prompt": "a long story", "max_new_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/generate", json=body, timeout=30) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data: ")]
        assert received
    # The engine frees the blocks at its next step after the abort.
    wait_for(lambda: httpx.get(f"{server.url}/ready").json()["requests_in_flight"] == 0)
    wait_for(lambda: httpx.get(f"{server.url}/ready").json()["kv_cache_usage"] == 0.0)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'reft_requests_total{adapter="base",status="abort"}' in metrics


def test_load_generator_counts_every_token_and_error(server):
    mix = dict(prompt_len=(4, 40), output_len=(2, 12), adapters=("steer", "missing"), base_share=0.3, seed=3)
    closed = asyncio.run(run_load(server.url, LoadSpec(requests=12, concurrency=4, **mix)))
    poisson = asyncio.run(run_load(server.url, LoadSpec(requests=6, rate=20.0, **mix)))
    for summary in (closed, poisson):
        assert summary["completed"] + summary["errors"] == summary["requests"]
        assert summary["error_kinds"] == {"HTTP 404": summary["errors"]} and summary["errors"] > 0
        assert summary["completed"] > 0 and summary["ttft_s"]["p50"] > 0 and summary["e2e_s"]["p99"] > 0
        assert 0 < summary["client_cpu_share"] < 2, "the generator reports the share of a core it used itself"
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_load("http://example.com:8000", LoadSpec(requests=1)))


def test_large_reports_reach_every_stream(server):
    """Many streams with 20 logprobs a token: the engine process's reports outgrow the pipe's buffer and
    arrive in pieces, which uvloop's non-blocking pipe once turned into a dead engine (every request failed)."""

    async def stream(client, i: int) -> list[str]:
        body = {"prompt": f"story {i}", "max_new_tokens": 24, "logprobs": 20, "ignore_eos": True, "stream": True}
        async with client.stream("POST", f"{server.url}/v1/generate", json=body, timeout=60) as response:
            assert response.status_code == 200
            return [line async for line in response.aiter_lines() if line.startswith("data: ")]

    async def all_streams():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=128)) as client:
            return await asyncio.gather(*(stream(client, i) for i in range(128)))

    for events in asyncio.run(all_streams()):
        chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]  # the last one is [DONE]
        assert events[-1] == "data: [DONE]" and all("error" not in chunk for chunk in chunks)
        assert sum(len(chunk["logprobs"]) for chunk in chunks) == 24 and chunks[-1]["finish_reason"] == "length"


def test_two_servers_on_one_store_see_each_others_changes(server, replica):
    def generate_on_b(adapter):
        return httpx.post(
            f"{replica.url}/v1/generate", json={"prompt": "shared", "adapter": adapter, "max_new_tokens": 4}
        )

    published = upload(server.url, "replicated", adapter_bytes(2))  # published on A
    on_b = generate_on_b("replicated")  # B finds a name it has not seen yet at once
    assert on_b.status_code == 200 and on_b.json()["adapter"] == {"name": "replicated", "version": 1}
    assert published["version"] == 1

    upload(server.url, "replicated", adapter_bytes(3))  # v2 on A: B serves it within its sync interval
    wait_for(lambda: generate_on_b("replicated").json()["adapter"]["version"] == 2, timeout=5)
    wait_for(lambda: "replicated" in [m["id"] for m in httpx.get(f"{replica.url}/v1/models").json()["data"]])

    assert httpx.delete(f"{server.url}/v1/adapters/replicated", headers=ADMIN).status_code == 200
    wait_for(lambda: generate_on_b("replicated").status_code == 404, timeout=5)


def test_two_servers_on_one_store_compare_and_swap(server, replica, store):
    urls = [server.url, replica.url]
    created = httpx.post(
        f"{server.url}/v1/adapters/cas-shared",
        files={"file": ("a.safetensors", adapter_bytes(5))},
        headers={**ADMIN, "If-None-Match": "*"},
    )
    assert created.status_code == 201

    def writer(index: int) -> list[tuple[int, int, int]]:
        outcomes = []
        for round_ in range(3):
            url = urls[(index + round_) % 2]  # each writer alternates replicas
            seen = httpx.get(f"{url}/v1/adapters/cas-shared", headers=ADMIN).headers["etag"]
            response = httpx.post(
                f"{url}/v1/adapters/cas-shared",
                files={"file": ("a.safetensors", adapter_bytes(6))},
                headers={**ADMIN, "If-Match": seen},
                timeout=30,
            )
            outcomes.append((response.status_code, int(seen.strip('"')), int(response.headers["etag"].strip('"'))))
        return outcomes

    with ThreadPoolExecutor(4) as pool:
        outcomes = [o for result in pool.map(writer, range(4)) for o in result]
    won = [(seen, made) for status, seen, made in outcomes if status == 201]
    assert all(status in (201, 412) for status, _, _ in outcomes)
    assert all(made == seen + 1 for seen, made in won)
    assert sorted(seen for seen, _ in won) == list(range(1, len(won) + 1)), "no version replaced twice"
    assert AdapterStore(store).versions("cas-shared") == list(range(1, len(won) + 2))
    stale = httpx.delete(f"{replica.url}/v1/adapters/cas-shared", headers={**ADMIN, "If-Match": '"1"'})
    assert stale.status_code == 412 and stale.headers["etag"] == f'"{len(won) + 1}"'


@pytest.mark.parametrize(
    "engine_core, options", [*((core, ()) for core in ENGINE_CORES), ("process", ("--async-scheduling",))]
)
def test_sigterm_drains_running_requests_then_exits(tiny_model_dir, tmp_path, engine_core, options):
    process = ServerProcess(
        tmp_path / "drain.log",
        "--model",
        str(tiny_model_dir("llama")),
        "--store",
        str(tmp_path / "s"),
        "--shutdown-grace",
        "60",
        "--engine-core",
        engine_core,
        *options,
        *SERVE_ARGS,
    )
    events = []
    first = threading.Event()

    def long_stream():
        body = {"prompt": "drain me", "max_new_tokens": 250, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{process.url}/v1/generate", json=body, timeout=120) as response:
            for event in sse_events(response.iter_lines()):
                events.append(event)
                first.set()

    try:
        runner = threading.Thread(target=long_stream)
        runner.start()
        assert first.wait(30)
        process.signal(signal.SIGTERM)
        assert process.wait(90) == 0
        runner.join(10)
        assert events[-1] == "[DONE]" and events[-2]["finish_reason"] == "length"
        assert sum(len(e["token_ids"]) for e in events[:-1]) == 250
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{process.url}/health")
        assert "stopped" in process.log()
        assert "leaked" not in process.log()  # the interpreter's teardown is skipped: nanobind has nothing to say
    finally:
        process.stop()


@pytest.mark.parametrize("engine_core", ENGINE_CORES)
def test_streams_still_running_when_the_grace_ends_are_aborted_with_done(tiny_model_dir, tmp_path, engine_core):
    """No stream is cut off: what the grace period did not let finish ends with an abort event and [DONE]
    before uvicorn closes the connections."""
    model, store = str(tiny_model_dir("llama")), str(tmp_path / "s")
    args = ("--model", model, "--store", store, "--shutdown-grace", "0", "--engine-core", engine_core, *SERVE_ARGS)
    process = ServerProcess(tmp_path / "grace.log", *args)
    streams = [[] for _ in range(4)]
    started = threading.Barrier(len(streams) + 1)

    def long_stream(events):
        body = {"prompt": "never done", "max_new_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{process.url}/v1/generate", json=body, timeout=60) as response:
            for event in sse_events(response.iter_lines()):
                if not events:
                    started.wait(30)
                events.append(event)

    try:
        runners = [threading.Thread(target=long_stream, args=(events,)) for events in streams]
        for runner in runners:
            runner.start()
        started.wait(30)
        process.signal(signal.SIGTERM)
        assert process.wait(60) == 0
        for runner in runners:
            runner.join(10)
        for events in streams:
            assert events[-1] == "[DONE]" and events[-2]["finish_reason"] == "abort", events[-2:]
    finally:
        process.stop()


PUBLISH_LOOP = """
import sys
from server.adapters.store import AdapterStore
store = AdapterStore(sys.argv[1])
data = open(sys.argv[2], "rb").read()
while True:
    store.publish("hammered", data)
"""


def test_sigkill_mid_publish_leaves_a_store_a_restarted_server_loads(tiny_model_dir, tmp_path):
    store_dir = tmp_path / "store"
    payload = tmp_path / "adapter.safetensors"
    payload.write_bytes(adapter_bytes(4))
    rng = random.Random(0)
    for _ in range(5):
        writer = subprocess.Popen([sys.executable, "-c", PUBLISH_LOOP, str(store_dir), str(payload)])
        time.sleep(rng.uniform(0.6, 1.5))
        writer.kill()  # SIGKILL: no cleanup runs
        writer.wait()
    store = AdapterStore(store_dir)
    versions = store.versions("hammered")
    assert len(versions) > 5
    assert store.current("hammered") in versions
    for version in versions:
        AdapterFile.from_bytes(store.read("hammered", version)[1])  # every visible version is complete

    process = ServerProcess(
        tmp_path / "restart.log", "--model", str(tiny_model_dir("llama")), "--store", str(store_dir), *SERVE_ARGS
    )
    try:
        listing = httpx.get(f"{process.url}/v1/adapters", headers=ADMIN).json()
        assert [a["name"] for a in listing] == ["hammered"] and listing[0]["versions"] == versions
        out = httpx.post(
            f"{process.url}/v1/generate", json={"prompt": "after the crash", "adapter": "hammered", "max_new_tokens": 4}
        )
        assert out.status_code == 200 and out.json()["adapter"]["version"] == store.current("hammered")
    finally:
        process.stop()
