"""The metrics an inference gateway's endpoint picker routes on (the Gateway API Inference Extension's
model-server protocol), read from the server's own /metrics under load: the queue and running
gauges, KV cache usage, and the one-series adapter info gauge whose running and waiting lists follow
requests for different adapters as they run and queue. A running batch of two makes the others wait.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.adapters.random_adapters import random_adapter_file
from server.cli import build_parser, settings_from_args
from server.config import Settings
from server.metrics import Metrics
from tests.api_utils import running_app, upload

MAX_RESIDENT_ADAPTERS = 6
LONG = 200  # tokens: a request that stays running while the test looks
POLL_DEADLINE = 60.0
INFO_LABELS = {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
PROTOCOL_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


class Scrape:
    """One /metrics answer, parsed."""

    def __init__(self, text: str):
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str):
        return self.families[name].samples

    def value(self, name: str) -> float:
        (sample,) = self.samples(name)
        return sample.value

    def adapters(self, name: str = "vllm:lora_requests_info") -> tuple[set[str], set[str]]:
        (sample,) = self.samples(name)  # one series, whatever has changed before
        return _names(sample.labels["running_lora_adapters"]), _names(sample.labels["waiting_lora_adapters"])


def _names(csv: str) -> set[str]:
    return {name for name in csv.split(",") if name}


def scrape(client) -> Scrape:
    return Scrape(client.get("/metrics").text)


def wait_for(client, condition, what: str) -> Scrape:
    deadline = time.monotonic() + POLL_DEADLINE
    while time.monotonic() < deadline:
        current = scrape(client)
        if condition(current):
            return current
        time.sleep(0.005)
    raise AssertionError(f"never saw {what}; last: {current.adapters()}")


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_dir):
    store = tmp_path_factory.mktemp("store")
    with running_app(
        tiny_model_dir("llama"), store, max_num_seqs=2, max_resident_adapters=MAX_RESIDENT_ADAPTERS
    ) as client:
        for seed, name in enumerate("abcd"):
            adapter = random_adapter_file("loreft", (1, 2), 4, "f1+l1", 128, seed=seed)
            assert upload(client, name, adapter.to_bytes()).status_code == 201
        yield client


def complete(client, model: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": "Hello there", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def base_model(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def test_protocol_metrics_have_the_types_and_labels_endpoint_pickers_read(client):
    complete(client, "a", 2)  # one engine step at least
    current = scrape(client)
    for name in (*PROTOCOL_GAUGES, "vllm:lora_requests_info", "vllm:cache_config_info", "reft_adapter_requests_info"):
        assert current.families[name].type == "gauge", name
    for name in PROTOCOL_GAUGES:
        (sample,) = current.samples(name)
        assert sample.labels == {"model_name": base_model(client)}
    for name in ("vllm:lora_requests_info", "reft_adapter_requests_info"):
        (sample,) = current.samples(name)
        assert set(sample.labels) == INFO_LABELS
        assert sample.labels["max_lora"] == str(MAX_RESIDENT_ADAPTERS)
        assert time.time() - 600 < sample.value <= time.time(), "the value is the last update's Unix time"
    (cache,) = current.samples("vllm:cache_config_info")
    assert int(cache.labels["block_size"]) == current.value("reft_kv_cache_block_size") == 16
    assert int(cache.labels["num_gpu_blocks"]) == current.value("reft_kv_cache_blocks") > 0


def test_adapter_lists_follow_requests_as_they_run_and_queue(client):
    """a and b fill the running batch of two; c and d queue behind them, then run when they finish."""
    scrapes = []

    def seen(condition, what):
        found = wait_for(client, condition, what)
        scrapes.append(found)
        return found

    with ThreadPoolExecutor(4) as pool:
        first = [pool.submit(complete, client, name, LONG) for name in "ab"]
        seen(lambda s: s.adapters() == ({"a", "b"}, set()), "a and b running")
        later = [pool.submit(complete, client, name, LONG) for name in "cd"]
        both = seen(
            lambda s: s.adapters() == ({"a", "b"}, {"c", "d"}) and s.value("vllm:num_requests_waiting") == 2,
            "c and d waiting behind a and b",
        )
        assert both.value("vllm:num_requests_running") == both.value("reft_running_requests") == 2
        assert both.value("reft_queue_length") == 2
        assert 0 < both.value("vllm:kv_cache_usage_perc") <= 1 and 0 < both.value("reft_kv_cache_usage_ratio") <= 1
        assert both.adapters("reft_adapter_requests_info") == both.adapters()
        seen(lambda s: s.adapters() == ({"c", "d"}, set()), "c and d running once a and b are done")
        for future in first + later:
            assert future.result()["usage"]["completion_tokens"] == LONG
    idle = scrape(client)
    scrapes.append(idle)
    assert idle.adapters() == (set(), set()) and idle.adapters("reft_adapter_requests_info") == (set(), set())
    assert idle.value("vllm:num_requests_waiting") == idle.value("vllm:num_requests_running") == 0
    stamps = [s.samples("vllm:lora_requests_info")[0].value for s in scrapes]
    assert stamps == sorted(stamps) and stamps[0] < stamps[-1], "each update stamps the time"


def test_an_adapter_loading_for_a_request_is_listed_as_waiting(client):
    """Before the engine has the request, its adapter is loading: a picker that saw no trace of it would send
    the adapter's next requests to other replicas, each loading it too."""
    assert (
        upload(client, "loading", random_adapter_file("loreft", (1,), 4, "f1", 128, seed=9).to_bytes()).status_code
        == 201
    )
    registry, release = client.app.state.reft.registry, threading.Event()
    load = registry._load
    registry._load = lambda name, version: release.wait(POLL_DEADLINE) and load(name, version)
    try:
        with ThreadPoolExecutor(1) as pool:
            request = pool.submit(complete, client, "loading", 2)
            during = wait_for(client, lambda s: "loading" in s.adapters()[1], "the loading adapter listed as waiting")
            assert "loading" in during.adapters("reft_adapter_requests_info")[1] and not request.done()
            release.set()
            assert request.result()["usage"]["completion_tokens"] == 2
    finally:
        release.set()
        registry._load = load
    assert scrape(client).adapters() == (set(), set())


def test_base_model_requests_list_no_adapter(client):
    complete(client, base_model(client), 2)
    assert scrape(client).adapters() == (set(), set())


def test_vllm_names_can_be_turned_off():
    assert Settings().vllm_compatible_metrics is True
    args = build_parser().parse_args(["serve", "--no-vllm-compatible-metrics"])
    assert settings_from_args(args).vllm_compatible_metrics is False
    metrics = Metrics(max_lora=3, model_name="m", vllm_compatible=False)
    metrics.observe_load(waiting=1, running=2, kv_usage=0.5, kv_blocks=10, block_size=16)
    metrics.observe_adapters(["x"], ["y", "z"])
    text = metrics.render().decode()
    assert "vllm:" not in text
    assert Scrape(text).adapters("reft_adapter_requests_info") == ({"x"}, {"y", "z"})
