"""The same load figures under vLLM's metric names, so tools that read vLLM's load figures work
unchanged: the Gateway API Inference Extension's endpoint picker (whose defaults are these names),
KEDA/HPA recipes on the queue. Not vLLM's dashboards: the latency histograms and token counters
have their `reft_*` names only. On by default (`--vllm-compatible-metrics`); the native `reft_*`
series are exported either way.

The names are those the current endpoint picker (llm-d-router) reads by default. As in vLLM, the
load gauges carry a `model_name` label (the served model name) and the info gauges hold their
values in labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from server.adapter_requests_info import AdapterRequestsInfo


class VllmCompatibleMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str, max_lora: int) -> None:
        r = registry
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting for the engine", ["model_name"], registry=r
        ).labels(model_name)
        self.running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch", ["model_name"], registry=r
        ).labels(model_name)
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV cache usage as a fraction (0 to 1)", ["model_name"], registry=r
        ).labels(model_name)
        self.cache_config = Gauge(
            "vllm:cache_config_info", "KV cache shape, in labels", ["block_size", "num_gpu_blocks"], registry=r
        )
        self.adapters = AdapterRequestsInfo(
            "vllm:lora_requests_info", "Adapters of running and waiting requests", max_lora, registry
        )

    def observe_kv_cache_shape(self, block_size: int, num_blocks: int) -> None:
        # fixed for the engine's life, so this stays one series
        self.cache_config.labels(str(block_size), str(num_blocks)).set(1)
