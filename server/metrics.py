"""Prometheus metrics: the conventional LLM-server figures plus the adapter registry's.

Each app owns its own CollectorRegistry, so several apps (tests, several servers in one process)
never collide. Counters carry an `adapter` label (the adapter name, "base" without one); latency
histograms are unlabelled to keep cardinality bounded with thousands of adapters.

The load figures an endpoint picker routes on (queue, running batch, KV cache usage, the adapters of
running and waiting requests) are set together once per engine step by `observe_load` and
`observe_adapters`, under the native names and, when enabled, under vLLM's (`server.vllm_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.adapter_requests_info import AdapterRequestsInfo
from server.vllm_metrics import VllmCompatibleMetrics

disable_created_metrics()  # no *_created series: they double the output and no dashboard uses them

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BASE_LABEL = "base"
STEP_KINDS = ("decode", "prefill")
# where a step's time goes: choosing its chunks; packing them, running the forward (a graph replay, or an eager
# forward launched kernel by kernel) and drawing its tokens; reading a step's drawn tokens and accepting them
STEP_PHASES = ("schedule", "launch", "read")


class Metrics:
    def __init__(self, *, max_lora: int = 0, model_name: str = "", vllm_compatible: bool = False) -> None:
        """`max_lora`: the resident-adapter bound reported to endpoint pickers; `model_name`: the served
        model name, a label of the vLLM-named gauges; `vllm_compatible`: export those too."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "reft_requests", "Finished generation requests by adapter and status", ["adapter", "status"], registry=r
        )
        self.rejected = Counter("reft_requests_rejected", "Requests refused before the engine", ["reason"], registry=r)
        self.prompt_tokens = Counter("reft_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter("reft_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.ttft = Histogram(
            "reft_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "reft_inter_token_latency_seconds", "Time between tokens", buckets=TOKEN_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "reft_e2e_request_latency_seconds", "Request latency, end to end", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_length = Gauge("reft_queue_length", "Requests waiting for the engine", registry=r)
        self.running = Gauge("reft_running_requests", "Requests in the running batch", registry=r)
        self.kv_usage = Gauge("reft_kv_cache_usage_ratio", "Share of KV cache blocks in use", registry=r)
        self.kv_blocks = Gauge("reft_kv_cache_blocks", "KV cache blocks in the pool", registry=r)
        self.kv_block_size = Gauge("reft_kv_cache_block_size", "Tokens per KV cache block", registry=r)
        self.adapter_requests = AdapterRequestsInfo(
            "reft_adapter_requests_info", "Adapters of running and waiting requests", max_lora, r
        )
        self.preemptions = Counter("reft_preemptions", "Sequences preempted for KV memory", registry=r)
        self.prefix_queries = Counter(
            "reft_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter("reft_prefix_cache_hits", "Prompt tokens served from the prefix cache", registry=r)
        # by kind: "decode" steps take one token per sequence (what CUDA graphs replay), "prefill" steps also
        # carry prompt chunks (and the adapters' edits): their share and cost say what mixing costs decoding
        self.step_tokens = Histogram(
            "reft_step_batch_tokens", "Tokens per engine step", ["kind"], buckets=BATCH_BUCKETS, registry=r
        )
        self.step_requests = Histogram(
            "reft_step_batch_requests", "Requests per engine step", ["kind"], buckets=BATCH_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "reft_step_duration_seconds", "Engine step duration", ["kind"], buckets=TOKEN_LATENCY_BUCKETS, registry=r
        )
        self.step_device_wait = Counter(
            "reft_step_device_wait_seconds",
            "Time engine steps spent blocked for the device's results: a share of reft_step_duration_seconds_sum "
            "near 1 means the device is the bottleneck, near 0 the host",
            registry=r,
        )
        self.step_phase_seconds = Counter(
            "reft_step_phase_seconds",
            "Time engine steps spent choosing their chunks (schedule), packing them, running the forward and "
            "drawing tokens (launch), and reading and accepting drawn tokens (read): shares of "
            "reft_step_duration_seconds_sum",
            ["kind", "phase"],
            registry=r,
        )
        self.step_cpu_seconds = Counter(
            "reft_step_cpu_seconds",
            "CPU time of the engine's thread in steps: what reft_step_duration_seconds_sum has beyond it, the "
            "thread spent off the CPU, waiting to run (for the GIL or a core). On CUDA it includes the device waits "
            "(CUDA's synchronizations spin); on a CPU device the forward's other threads are not counted",
            ["kind"],
            registry=r,
        )
        for kind in STEP_KINDS:  # both series from the start, so that rates over them never miss one
            for series in (self.step_tokens, self.step_requests, self.step_seconds, self.step_cpu_seconds):
                series.labels(kind)
            for phase in STEP_PHASES:
                self.step_phase_seconds.labels(kind, phase)
        self.adapters_stored = Gauge("reft_adapters_stored", "Adapters in the store", registry=r)
        self.adapters_resident = Gauge("reft_adapters_resident", "Adapters loaded on the model's device", registry=r)
        self.adapter_resident_bytes = Gauge("reft_adapters_resident_bytes", "Bytes of resident adapters", registry=r)
        self.adapters_foreign = Gauge(
            "reft_adapters_foreign", "Stored adapters trained on another base model (fingerprint differs)", registry=r
        )
        self.adapters_unverified = Gauge(
            "reft_adapters_unverified", "Stored adapters without a base-model fingerprint", registry=r
        )
        self.adapter_load_seconds = Histogram(
            "reft_adapter_load_seconds", "Adapter load latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.adapter_cache_hits = Counter("reft_adapter_cache_hits", "Adapter lookups served resident", registry=r)
        self.adapter_cache_misses = Counter("reft_adapter_cache_misses", "Adapter lookups that loaded", registry=r)
        self.adapter_evictions = Counter("reft_adapter_evictions", "Adapters evicted from memory", registry=r)
        self.vllm = VllmCompatibleMetrics(r, model_name, max_lora) if vllm_compatible else None

    def observe_step(
        self,
        num_tokens: int,
        num_seqs: int,
        num_prefill_tokens: int,
        seconds: float,
        device_wait_seconds: float,
        phase_seconds: dict[str, float],
        cpu_seconds: float,
    ) -> None:
        kind = STEP_KINDS[num_prefill_tokens > 0]
        self.step_tokens.labels(kind).observe(num_tokens)
        self.step_requests.labels(kind).observe(num_seqs)
        self.step_seconds.labels(kind).observe(seconds)
        self.step_device_wait.inc(device_wait_seconds)
        for phase, spent in phase_seconds.items():
            self.step_phase_seconds.labels(kind, phase).inc(spent)
        self.step_cpu_seconds.labels(kind).inc(cpu_seconds)

    def watch_residents(self, residents: Callable[[], list[tuple[str, int]]], max_series: int) -> None:
        """Export `residents()` (name, version), most recently used first, as an info gauge of at
        most `max_series` series: bounded cardinality however many adapters the store holds."""
        self.registry.register(_ResidentInfo(residents, max_series))

    def watch_loading(self, loading: Callable[[], Iterable[str]]) -> None:
        """List the adapters that `loading()` names, being loaded for requests, among the waiting ones."""
        self.adapter_requests.loading = loading
        if self.vllm:
            self.vllm.adapters.loading = loading

    def observe_load(self, *, waiting: int, running: int, kv_usage: float, kv_blocks: int, block_size: int) -> None:
        self.queue_length.set(waiting)
        self.running.set(running)
        self.kv_usage.set(kv_usage)
        self.kv_blocks.set(kv_blocks)
        self.kv_block_size.set(block_size)
        if self.vllm:
            self.vllm.waiting.set(waiting)
            self.vllm.running.set(running)
            self.vllm.kv_usage.set(kv_usage)
            self.vllm.observe_kv_cache_shape(block_size, kv_blocks)

    def observe_adapters(self, running: Sequence[str], waiting: Sequence[str]) -> None:
        """Names of the adapters of the running and of the waiting requests, each name once."""
        self.adapter_requests.update(running, waiting)
        if self.vllm:
            self.vllm.adapters.update(running, waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ResidentInfo(Collector):
    def __init__(self, residents: Callable[[], list[tuple[str, int]]], max_series: int):
        self.residents = residents
        self.max_series = max_series

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "reft_adapter_resident_info",
            "1 per resident adapter version (the most recently used, at most --max-resident-adapters)",
            labels=["adapter", "version"],
        )
        for name, version in self.residents()[: self.max_series]:
            family.add_metric([name, str(version)], 1)
        yield family
