"""The adapters a tensor-parallel group's followers hold: rank 0 sends each one's tensors once. The
engine process (server/engine_process.py) is fed the same way by the server's process.

ReFT edits act on the full hidden state, which every rank holds after a layer's all-reduce, so every
rank applies every edit of a step and needs the adapters' weights. Rank 0 sends them rather than
letting followers read the shared store by name@version, because:
- the followers then apply exactly the tensors rank 0 applies (already validated and cast), with no
  second validation and no digest to compare;
- a store read can fail where rank 0's did not: the name may be deleted after rank 0 loaded it (a
  running request still holds that version), and adapters handed to the engine in-process were
  never in a store;
- the cost is one broadcast per adapter and residency, a few MB even for a 70B model's adapter,
  next to a step's all-reduces.
Followers keep what they were sent in an LRU with rank 0's residency budget: rank 0 tracks what
they hold and tells them what to drop, so they never need to ask back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from server.adapters.format import AdapterFile, tensor_name
from server.adapters.materialize import materialize
from server.engine.model_runner import StepBatch
from server.reft.adapter import Adapter
from server.reft.config import AdapterConfig


@dataclass
class AdapterPayload:
    name: str
    version: int
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]  # on the CPU, as rank 0 applies them

    @classmethod
    def of(cls, adapter: Adapter) -> AdapterPayload:
        tensors = {
            tensor_name(layer, index, param): value.cpu()
            for layer, interventions in adapter.layers.items()
            for index, intervention in enumerate(interventions)
            for param, value in intervention.params.items()
        }
        return cls(adapter.name, adapter.version, adapter.config, tensors)

    def to_adapter(self, dtype: torch.dtype, device: torch.device) -> Adapter:
        return materialize(
            AdapterFile(self.config, self.tensors), name=self.name, version=self.version, dtype=dtype, device=device
        )


@dataclass
class StepMessage:
    """A step as sent to followers: edits name their adapter by digest; new adapters come along."""

    batch: StepBatch  # edits carry no owner and no adapter
    edit_adapters: list[str]  # the digest of each edit's adapter
    new_adapters: dict[str, AdapterPayload] = field(default_factory=dict)
    dropped_adapters: list[str] = field(default_factory=list)


class AdapterSender:
    """Rank 0's record of what the followers hold, within the residency budget."""

    def __init__(self, max_bytes: int, max_count: int):
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._held: OrderedDict[str, int] = OrderedDict()  # digest -> bytes, least recently used first

    def message(self, batch: StepBatch) -> StepMessage:
        new, dropped = self.update({chunk.adapter.digest: chunk.adapter for chunk in batch.edits})
        edits = [replace(chunk, owner=None, adapter=None) for chunk in batch.edits]
        wire = replace(batch, edits=edits)
        return StepMessage(wire, [chunk.adapter.digest for chunk in batch.edits], new, dropped)

    def update(self, used: dict[str, Adapter]) -> tuple[dict[str, AdapterPayload], list[str]]:
        """The payloads of the `used` adapters (by digest) the other side lacks, and the digests it
        should drop to stay within the budget (never one of `used`)."""
        new = {}
        for digest, adapter in used.items():
            if digest in self._held:
                self._held.move_to_end(digest)
            else:
                new[digest] = AdapterPayload.of(adapter)
                self._held[digest] = adapter.nbytes
        return new, self._evict(keep=used)

    @contextmanager
    def sending(self) -> Iterator[None]:
        """Around building and sending a message: if that raises, the record is as it was before, since
        the other side got neither the message's new adapters nor its order to drop some."""
        held = self._held.copy()
        try:
            yield
        except BaseException:
            self._held = held
            raise

    def forget(self, digest: str) -> None:
        """The other side does not hold `digest` after all: send it again when it is next used."""
        self._held.pop(digest, None)

    def _evict(self, keep) -> list[str]:
        dropped = []
        for digest in list(self._held):
            if sum(self._held.values()) <= self.max_bytes and len(self._held) <= self.max_count:
                break
            if digest not in keep:  # this step's adapters stay, whatever the budget says
                del self._held[digest]
                dropped.append(digest)
        return dropped


class AdapterReceiver:
    """A follower's adapters, by digest, as rank 0 sent them."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        self.adapters: dict[str, Adapter] = {}

    def batch(self, message: StepMessage) -> StepBatch:
        """Take in the message's adapter changes and return its batch with every edit's adapter."""
        self.receive(message.new_adapters, message.dropped_adapters)
        edits = [
            replace(chunk, owner=index, adapter=self.adapters[digest])
            for index, (chunk, digest) in enumerate(zip(message.batch.edits, message.edit_adapters, strict=True))
        ]
        return replace(message.batch, edits=edits)

    def receive(self, new: dict[str, AdapterPayload], dropped: list[str]) -> None:
        """Forget the `dropped` adapters (never one that `new` brings or the message uses; a sequence still
        running holds its own reference), then hold the `new` ones."""
        for digest in dropped:
            self.adapters.pop(digest, None)
        for digest, payload in new.items():
            self.adapters[digest] = payload.to_adapter(self.dtype, self.device)
