"""Helpers for HTTP tests: in-process apps (through TestClient, or served by uvicorn on loopback in a
thread), SSE parsing, adapter uploads, tar archives of checkpoints."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings

ADMIN_TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def app_settings(store: Path, **overrides) -> Settings:
    defaults = dict(
        store=store,
        admin_token=ADMIN_TOKEN,
        kv_cache_memory="32MiB",
        max_model_len=512,
        max_num_seqs=8,
        max_batched_tokens=128,
        store_sync_interval=0.2,
        log_json=False,
    )
    return Settings(**{**defaults, **overrides})


@contextmanager
def running_app(model_path: Path, store: Path, **overrides):
    app = create_app(app_settings(store, **overrides), model_path=str(model_path))
    with TestClient(app) as client:
        yield client


@contextmanager
def serving_on_loopback(model_path: Path, store: Path, **overrides) -> Iterator[str]:
    """The app served by a real uvicorn on 127.0.0.1 in a thread (real sockets, real body streaming,
    concurrent connections) without a process's start-up cost; yields its base URL."""
    app = create_app(app_settings(store, **overrides), model_path=str(model_path))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def sse_events(lines) -> Iterator:
    """Decoded `data:` payloads of an SSE stream as they arrive, ending with the string "[DONE]"."""
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)


def stream(client: TestClient, path: str, body: dict, **kwargs) -> list:
    with client.stream("POST", path, json=body, **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(response.iter_lines()))


def upload(client: TestClient, name: str, data: bytes, headers=ADMIN, **form):
    files = {"file": ("adapter.safetensors", data, "application/octet-stream")}
    return client.post(f"/v1/adapters/{name}", files=files, data=form or None, headers=headers)


def tar_directory(directory: Path, arcname: str = "checkpoint") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(directory, arcname=arcname)
    return buffer.getvalue()


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == response.status_code
    return body["error"]


def wait_for(condition, timeout: float = 10.0, interval: float = 0.1):
    """`condition()`'s first truthy result, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(interval)
    raise AssertionError("condition not met in time")
