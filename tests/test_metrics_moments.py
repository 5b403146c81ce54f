"""Metrics at moments the load tests do not look at: right after start-up, and as Prometheus stores them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.engine import core_loop
from tests.api_utils import running_app

DEPLOY = Path(__file__).parent.parent / "deploy"
ADAPTER_LIST_GAUGES = ("reft_adapter_requests_info", "vllm:lora_requests_info")


def test_a_ready_server_reports_its_kv_cache_shape_before_the_first_step(tmp_path, tiny_model_dir, monkeypatch):
    """An idle loop first reports after IDLE_WAIT_SECONDS: until then the picker read a cache of 0 blocks."""
    monkeypatch.setattr(core_loop, "IDLE_WAIT_SECONDS", 30.0)
    with running_app(tiny_model_dir("llama"), tmp_path) as client:
        assert client.get("/ready").status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    (blocks,) = families["reft_kv_cache_blocks"].samples
    (block_size,) = families["reft_kv_cache_block_size"].samples
    assert blocks.value > 0 and block_size.value == 16
    (cache,) = families["vllm:cache_config_info"].samples
    assert cache.labels == {"block_size": "16", "num_gpu_blocks": str(int(blocks.value))}


def test_prometheus_drops_the_adapter_list_gauges():
    """Their label values are the adapter lists: every new combination would be a new series in the TSDB."""
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    drops = [r for r in job.get("metric_relabel_configs", []) if r.get("action") == "drop"]
    assert drops and all(r["source_labels"] == ["__name__"] for r in drops)
    pattern = re.compile("|".join(f"(?:{r['regex']})" for r in drops))
    assert all(pattern.fullmatch(name) for name in ADAPTER_LIST_GAUGES)
    dashboard = (DEPLOY / "grafana" / "dashboards" / "reft-server.json").read_text()
    assert not any(pattern.fullmatch(name) for name in _metric_names(dashboard))


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b(?:reft_|vllm:)[a-z_:]+", text))
