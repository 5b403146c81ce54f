"""The adapter info gauge of the Gateway API Inference Extension's model-server protocol, in the shape
of vLLM's `vllm:lora_requests_info`: labels `max_lora`, `running_lora_adapters` and
`waiting_lora_adapters` (comma-separated adapter names), value the time of the last update.

An endpoint picker reads it for adapter affinity: it sends a request to a replica already running
its adapter. vLLM leaves a new series behind at every change of the lists and the picker takes the
newest; this collector exports only the current label set, so the family is always one series and
its cardinality stays bounded however many adapters come and go. It is a collector rather than a
labelled Gauge so that a scrape never sees the old series removed and the new one not yet added.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LABELS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters")


class AdapterRequestsInfo(Collector):
    def __init__(self, name: str, documentation: str, max_lora: int, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.max_lora = str(max_lora)
        # (running, waiting, timestamp): replaced whole, so a scrape on another thread reads one consistent state
        self._state: tuple[tuple[str, ...], tuple[str, ...], float] = ((), (), time.time())
        self.loading: Callable[[], Iterable[str]] = tuple  # adapters being loaded for requests (watch_loading)
        registry.register(self)

    def update(self, running: Iterable[str], waiting: Iterable[str]) -> None:
        """Adapter names of the running and the waiting requests (each name once)."""
        self._state = (tuple(running), tuple(waiting), time.time())

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=LABELS)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running, waiting, updated_at = self._state
        # a request whose adapter is still loading waits too, before the engine has it: listed, a picker sends
        # that adapter's next requests here rather than have another replica load it as well
        waiting = sorted({*waiting, *self.loading()})
        family = GaugeMetricFamily(self.name, self.documentation, labels=LABELS)
        family.add_metric([self.max_lora, ",".join(running), ",".join(waiting)], updated_at)
        yield family
