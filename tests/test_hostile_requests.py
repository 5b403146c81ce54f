"""Hostile HTTP requests against a real uvicorn on loopback: each is refused with a clear 4xx, cheaply
(before the body is read, before tokenizing), while requests running beside it return exactly the
tokens they return alone; and the operations side: /health follows the engine, a 500 is logged
once with its request id."""

import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from server.adapters.random_adapters import random_adapter_file
from server.api import health
from server.app import create_app
from server.logging_setup import JSONFormatter
from tests.api_utils import ADMIN, ADMIN_TOKEN, app_settings, error_of, serving_on_loopback
from tests.conftest import FIXTURE

HIDDEN = 192  # the fixture model
MAX_NUM_SEQS, MAX_QUEUE = 4, 8
PROMPTS = ["The quick brown fox", "Once upon a time", "In a galaxy far away", "Hello"]
MAX_NEW = 12
MiB = 2**20


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with serving_on_loopback(
        FIXTURE / "model",
        tmp_path_factory.mktemp("store"),
        max_model_len=128,
        max_num_seqs=MAX_NUM_SEQS,
        max_queue=MAX_QUEUE,
        max_upload_size="1MiB",
        prefix_caching=False,  # "alone" and "beside hostile traffic" both compute from scratch
    ) as base:
        yield base


def generate(url: str, prompt: str) -> list[int]:
    body = {"prompt": prompt, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["token_ids"]


def raw_exchange(url: str, head: str, body_chunks, chunked: bool = False) -> tuple[int, bytes, float]:
    """Send a request over a plain socket, stopping as soon as the server answers; returns the
    status, the response bytes and the seconds until the answer."""
    parts = urlsplit(url)
    started = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.encode())
        sock.settimeout(0)
        answer = b""
        for chunk in body_chunks:
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                sock.setblocking(True)
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
                sock.setblocking(False)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(30)
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    seconds = time.perf_counter() - started
    return int(answer.split(b" ", 2)[1]), answer, seconds


def prompt_chunks(total: int, chunk: int = 256 * 1024):
    yield b'{"prompt": "'
    for _ in range(total // chunk):
        yield b"a" * chunk
    yield b'"}'


# -- bodies ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_20mb_body_is_refused_fast_while_health_answers(url, declared):
    size = 20 * MiB
    host = urlsplit(url).netloc
    framing = f"Content-Length: {size + 14}" if declared else "Transfer-Encoding: chunked"
    head = f"POST /v1/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    health_latencies = []
    sending, polling = threading.Event(), threading.Event()

    def poll_health():  # at least once: a refusal at the headers can end the exchange before a poll would start
        sending.wait()
        while True:
            polling.set()
            started = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            health_latencies.append(time.perf_counter() - started)
            if not sending.is_set():
                return
            time.sleep(0.02)

    poller = threading.Thread(target=poll_health)
    poller.start()
    sending.set()
    polling.wait(10)
    try:
        status, answer, seconds = raw_exchange(url, head, prompt_chunks(size), chunked=not declared)
    finally:
        sending.clear()
        poller.join()
    assert status == 413 and b"request body larger than the limit" in answer
    assert seconds < 5
    assert health_latencies and max(health_latencies) < 1.0, health_latencies


def test_a_long_prompt_is_refused_by_characters_before_tokenizing(url):
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/generate", json={"prompt": "word " * 600_000}, timeout=30)
    assert response.status_code == 400 and "max_prompt_chars" in error_of(response)["message"]
    assert time.perf_counter() - started < 2


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(url):
    host = urlsplit(url).netloc
    head = (
        f"POST /v1/adapters/sneaky HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 209715200\r\n\r\n"
    )
    status, answer, seconds = raw_exchange(url, head, iter([b"--x\r\n"] + [b"\0" * 65536] * 4))
    assert status == 401 and b"admin token" in answer and seconds < 5


# -- hostile inputs beside running requests --------------------------------------------------------
def huge_adapter() -> bytes:
    adapter = random_adapter_file("loreft", (1,), 4, "f1+l1", HIDDEN, seed=3)
    adapter.tensors["layers.1.0.weight"] = torch.full((4, HIDDEN), 3e38)
    return adapter.to_bytes()


def bomb_archive() -> bytes:
    import gzip
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("c/intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin")
        info.size = 32 * MiB
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    return gzip.compress(buffer.getvalue())


def post_json(path: str, body):
    return lambda url: httpx.post(f"{url}{path}", json=body, timeout=60)


def post_raw(path: str, raw: bytes):
    return lambda url: httpx.post(f"{url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=60)


def post_form(path: str, files: dict, data: dict | None = None):
    return lambda url: httpx.post(f"{url}{path}", files=files, data=data, headers=ADMIN, timeout=60)


HOSTILE = {
    "top_k-generate": (post_json("/v1/generate", {"prompt": "hi", "temperature": 1, "top_k": 10**20}), 400),
    "top_k-completions": (
        post_json("/v1/completions", {"model": "model", "prompt": "hi", "top_k": 10**20, "max_tokens": 2}),
        400,
    ),
    "top_k-chat": (
        post_json(
            "/v1/chat/completions", {"model": "model", "messages": [{"role": "user", "content": "hi"}], "top_k": 10**20}
        ),
        400,
    ),
    "seed": (post_json("/v1/generate", {"prompt": "hi", "temperature": 1, "seed": 2**64}), 400),
    "stop_token_ids": (post_json("/v1/generate", {"prompt": "hi", "stop_token_ids": [2**63]}), 400),
    "max_new_tokens": (post_json("/v1/generate", {"prompt": "hi", "max_new_tokens": 10**30}), 400),
    "deep-json": (post_raw("/v1/generate", b"[" * 200_000 + b"]" * 200_000), 400),
    "5000-digits": (post_raw("/v1/generate", b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}"), 400),
    "body-5mb": (post_raw("/v1/generate", b'{"prompt": "' + b"a" * (5 * MiB) + b'"}'), 413),
    "prompt-list": (post_json("/v1/completions", {"model": "model", "prompt": ["hi"] * 40, "max_tokens": 2}), 400),
    "empty-prompt-list": (post_json("/v1/completions", {"model": "model", "prompt": [], "max_tokens": 2}), 400),
    "user-string": (post_json("/v1/completions", {"model": "model", "prompt": "hi", "user": "u" * 10_000}), 400),
    "huge-adapter": (post_form("/v1/adapters/huge", {"file": ("a.safetensors", huge_adapter())}), 422),
    "metadata-nesting": (
        post_form("/v1/adapters/nested", {"file": ("a.safetensors", b"x" * 100)}, {"metadata": "[" * 50_000}),
        400,
    ),
    "archive-bomb": (
        post_form(
            "/v1/adapters/bomb/pyreft",
            {"archive": ("a.tgz", bomb_archive())},
            {"positions": "f1", "share_weights": "true", "intervention_type": "loreft"},
        ),
        422,
    ),
    "no-token-upload": (lambda url: httpx.post(f"{url}/v1/adapters/x", files={"file": ("a", b"x" * MiB)}), 401),
}


@pytest.fixture(scope="module")
def alone(url) -> dict[str, list[int]]:
    return {prompt: generate(url, prompt) for prompt in PROMPTS}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_refused_and_running_requests_are_unharmed(url, alone, name):
    send, status = HOSTILE[name]
    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        running = {prompt: pool.submit(generate, url, prompt) for prompt in PROMPTS}
        response = pool.submit(send, url).result()
        beside = {prompt: future.result() for prompt, future in running.items()}
    assert response.status_code == status, response.text[:500]
    assert error_of(response)["message"]
    assert beside == alone
    assert httpx.get(f"{url}/health").status_code == 200


def test_the_prompt_list_bound_never_exceeds_what_the_queue_holds(tmp_path):
    settings = app_settings(tmp_path, max_model_len=64, max_num_seqs=1, max_queue=2, max_prompts=16)
    with TestClient(create_app(settings, model_path=str(FIXTURE / "model"))) as client:
        body = {"model": "model", "max_tokens": 1, "prompt": ["a", "b", "c", "d"]}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 400 and "the limit is 3" in error_of(response)["message"]
        assert client.post("/v1/completions", json={**body, "prompt": ["a", "b", "c"]}).status_code == 200


# -- operations -----------------------------------------------------------------------------------
@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(app_settings(tmp_path, max_model_len=64), model_path=str(FIXTURE / "model"))) as c:
        yield c


def test_health_fails_when_the_engine_thread_has_stopped(client):
    assert client.get("/health").status_code == 200
    client.portal.call(client.app.state.reft.engine.stop)
    response = client.get("/health")
    assert response.status_code == 503 and "engine has stopped" in error_of(response)["message"]


def test_health_fails_while_the_engine_is_stuck_with_work(client, monkeypatch):
    engine = client.app.state.reft.engine
    release = threading.Event()
    real_step = engine.host.core.step

    def stuck_step():
        release.wait(30)
        return real_step()

    monkeypatch.setattr(engine.host.core, "step", stuck_step)
    monkeypatch.setattr(health, "STALE_ENGINE_SECONDS", 0.3)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/v1/generate", json={"prompt": "hi", "max_new_tokens": 2})
        deadline = time.monotonic() + 10
        while (response := client.get("/health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert response.status_code == 503 and "has not reported" in error_of(response)["message"]
        release.set()
        assert pending.result().status_code == 200
    assert client.get("/health").status_code == 200


def test_a_500_is_logged_once_with_its_request_id(client):
    def boom():
        raise RuntimeError("a bug")

    client.app.add_api_route("/boom", boom)
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(json.loads(JSONFormatter().format(record)))

    root, handler = logging.getLogger(), Collect()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        response = client.get("/boom", headers={"X-Request-ID": "trace-me"})  # raises here if re-raised
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert response.status_code == 500 and error_of(response)["message"] == "internal server error"
    assert response.headers["x-request-id"] == "trace-me"
    tracebacks = [line for line in lines if "exc" in line]
    assert len(tracebacks) == 1 and "RuntimeError: a bug" in tracebacks[0]["exc"]
    assert tracebacks[0]["request_id"] == "trace-me"
    access = [line for line in lines if line["msg"] == "request"]
    assert access and access[0]["status"] == 500 and access[0]["request_id"] == "trace-me"


def test_admin_routes_still_need_the_token_with_or_without_a_body(url):
    assert httpx.get(f"{url}/v1/adapters").status_code == 401
    assert httpx.get(f"{url}/v1/adapters", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    assert httpx.delete(f"{url}/v1/adapters/x", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_the_adapter_magnitude_bound_is_a_setting_the_registry_applies_too(tmp_path):
    adapter = random_adapter_file("loreft", (1,), 4, "f1+l1", HIDDEN, seed=5)
    adapter.tensors["layers.1.0.weight"] = torch.full((4, HIDDEN), 50.0)
    settings = app_settings(tmp_path, max_model_len=64, adapter_max_abs=10.0)
    with TestClient(create_app(settings, model_path=str(FIXTURE / "model"))) as client:
        response = client.post("/v1/adapters/big", files={"file": ("a", adapter.to_bytes())}, headers=ADMIN)
        assert response.status_code == 422 and "adapter_max_abs" in error_of(response)["message"]
        client.app.state.reft.store.publish("big", adapter.to_bytes())  # another replica, or an older server
        response = client.post("/v1/generate", json={"prompt": "hi", "adapter": "big", "max_new_tokens": 2})
        assert response.status_code == 422 and "adapter_max_abs" in error_of(response)["message"]
