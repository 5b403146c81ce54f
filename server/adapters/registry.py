"""Resident adapters: resolves `name` or `name@version` to an Adapter on the model's device (on the CPU
when the engine runs in a process of its own, which keeps its own copies).

Loads happen on first use in a worker thread (never on the event loop or the engine loop), once
per version even under concurrent requests. Resident adapters form an LRU set bounded by bytes and
count; only adapters no request holds are evicted. A request holds a Lease for its whole life, so a
new version published meanwhile (hot swap) or a delete never changes what a running request uses.

The catalog (name -> current version) follows the store: local admin changes update it at once,
and a periodic sync picks up what other processes sharing the store published or deleted. Each
cataloged version's facts (creation time, base-model fingerprint) are read once from its header:
versions are immutable, so the cache never goes stale.

An adapter whose base-model fingerprint differs from the served model's was trained on another
checkpoint: it is refused at load unless `allow_foreign` (deliberate cross-checkpoint use).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch

from server.adapters.errors import AdapterError
from server.adapters.fingerprint import FOREIGN, UNVERIFIED, fingerprint_status
from server.adapters.format import AdapterFile
from server.adapters.materialize import materialize
from server.adapters.model_shape import ModelShape
from server.adapters.store import MAX_VERSION, AdapterStore, NotFound, check_name
from server.adapters.validation import validate
from server.metrics import Metrics
from server.reft.adapter import Adapter

log = logging.getLogger(__name__)


class AdapterNotFound(LookupError):
    pass


class AdapterIncompatible(ValueError):
    """A stored adapter that does not fit the served model."""


def parse_ref(ref: str) -> tuple[str, int | None]:
    """ "name" -> (name, None); "name@3" -> (name, 3)."""
    name, _, version = ref.partition("@")
    check_name(name)
    if not version:
        return name, None
    if not (version.isascii() and version.isdigit() and len(version) <= len(str(MAX_VERSION))) or int(version) < 1:
        raise ValueError(f"invalid adapter version in {ref[:100]!r}: use name@<integer from 1 to {MAX_VERSION}>")
    return name, int(version)


@dataclass(frozen=True)
class VersionFacts:
    """What the catalog knows of one stored version without loading it."""

    created: float  # unix time of the publish
    fingerprint: str  # of the base model it was trained on; "" = not recorded


@dataclass(frozen=True)
class ResidentReport:
    name: str
    version: int
    bytes: int
    loads: int  # times loaded from the store since this process started (reloads after eviction count)
    last_used: float  # unix time
    in_use: int  # requests holding it now


@dataclass(eq=False)
class Resident:
    adapter: Adapter
    refs: int = 0
    retired: bool = False  # its name was deleted: drop it once nobody uses it
    last_used: float = 0.0  # unix time of the last acquire


class Lease:
    """A running request's hold on a resident adapter; release exactly once when it finishes."""

    def __init__(self, registry: AdapterRegistry, resident: Resident):
        self._registry = registry
        self._resident: Resident | None = resident

    @property
    def adapter(self) -> Adapter:
        assert self._resident is not None, "lease already released"
        return self._resident.adapter

    def release(self) -> None:
        if self._resident is not None:
            self._registry.release_hold(self._resident)
            self._resident = None


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        model: ModelShape,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_bytes: int = 1 << 30,
        max_count: int = 1024,
        sync_interval: float = 2.0,
        metrics: Metrics | None = None,
        fingerprint: str = "",
        allow_foreign: bool = False,
    ):
        self.store = store
        self.model = model
        self.dtype = dtype
        self.device = device
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.sync_interval = sync_interval
        self.metrics = metrics
        self.fingerprint = fingerprint  # the served model's
        self.allow_foreign = allow_foreign
        self.catalog: dict[str, int] = {}
        self.facts: dict[tuple[str, int], VersionFacts] = {}
        self._loads: Counter[tuple[str, int]] = Counter()
        self._resident: OrderedDict[tuple[str, int], Resident] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Future[Resident]] = {}
        self._sync_task: asyncio.Task | None = None
        self._changed_while_scanning: dict[str, int | None] | None = None  # name -> version (None: deleted)
        self._retirements: Counter[str] = Counter()  # per name: deletes seen, so a load racing one knows
        self._write_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # name -> when the store lacked it as a request asked: asked again within a sync interval (or until
        # the next sync, which clears them), it costs no lookup
        self._missing: dict[str, float] = {}
        self._unreadable: dict[str, str] = {}  # as the last sync found them, with why

    # -- catalog ---------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Re-read every name's current version from the store (other processes' changes). A local
        publish, roll back or delete made while the store was read is newer than what was read: it stays."""
        self._changed_while_scanning = {}
        try:
            catalog, facts = await asyncio.to_thread(self._scan)
        finally:
            changed, self._changed_while_scanning = self._changed_while_scanning, None
        for name, version in changed.items():
            if version is None:
                catalog.pop(name, None)
            else:
                catalog[name] = version
                if (name, version) in self.facts:
                    facts[name, version] = self.facts[name, version]
        for name in set(self.catalog) - set(catalog):
            self._retire(name)
        self.catalog, self.facts = catalog, facts
        self._missing.clear()  # a name another replica has published since is looked up again
        self._report()

    def _scan(self) -> tuple[dict[str, int], dict[tuple[str, int], VersionFacts]]:
        served = self.store.served()
        catalog, facts = {}, {}
        unreadable = set(served.unreadable)
        for name, why in served.unreadable.items():
            if self._unreadable.get(name) != why:  # once per state of the name, not at every sync
                log.error("adapter store sync: reading %r failed: %s", name, why)
        self._unreadable = served.unreadable
        for name, version in served.versions.items():
            try:
                facts[name, version] = self.version_facts(name, version)
                catalog[name] = version
            except NotFound:
                continue  # deleted while we looked
            except Exception:
                log.exception("adapter store sync: reading %r failed", name)
                unreadable.add(name)
        for name in unreadable:  # one unreadable name must not stop the others' sync: what was known stays
            if (known := self.catalog.get(name)) is not None:
                catalog[name] = known
                if (name, known) in self.facts:
                    facts[name, known] = self.facts[name, known]
        return catalog, facts

    def version_facts(self, name: str, version: int) -> VersionFacts:
        """Cached; reads the version's header the first time (blocking: call it off the event loop)."""
        known = self.facts.get((name, version))
        if known is not None:
            return known
        info = self.store.version_info(name, version)
        try:
            fingerprint = self.store.read_config(name, version).base_model_fingerprint
        except (AdapterError, OSError):
            fingerprint = ""  # unreadable: its load will say why
        return VersionFacts(info.created, fingerprint)

    def served_versions(self) -> list[tuple[str, int, VersionFacts]]:
        """(name, current version, its facts) for every cataloged name, sorted (blocking: reads headers)."""
        served = []
        for name, version in sorted(dict(self.catalog).items()):
            try:
                served.append((name, version, self.version_facts(name, version)))
            except NotFound:
                continue  # deleted since the last sync
        return served

    def fingerprint_counts(self) -> Counter[str]:
        """How many cataloged adapters are verified, unverified or foreign (their current versions)."""
        return Counter(
            fingerprint_status(facts.fingerprint, self.fingerprint)
            for (name, version), facts in self.facts.items()
            if self.catalog.get(name) == version
        )

    async def start(self) -> None:
        await self.refresh()
        self._sync_task = asyncio.create_task(self._sync_loop())

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval)
            try:
                await self.refresh()
            except Exception:  # a flaky volume must not stop the loop
                log.exception("adapter store sync failed")

    @asynccontextmanager
    async def local_write(self, name: str) -> AsyncIterator[None]:
        """Held by the admin API around a write of `name` to the store and its report here (`published`,
        `deleted`), so that this replica's writes of one name reach the catalog in the store's order."""
        lock = self._write_locks.get(name)
        if lock is None:
            lock = self._write_locks[name] = asyncio.Lock()
        async with lock:
            yield

    def published(self, name: str, version: int, facts: VersionFacts | None = None) -> None:
        """A local publish or roll back: serve `version` for `name` from now on."""
        self._note_local_change(name, version)
        self._missing.pop(name, None)
        self.catalog[name] = version
        if facts is not None:
            self.facts[name, version] = facts
        self._report()

    def deleted(self, name: str) -> None:
        self._note_local_change(name, None)
        self.catalog.pop(name, None)
        self._retire(name)
        self._report()

    def _note_local_change(self, name: str, version: int | None) -> None:
        if self._changed_while_scanning is not None:
            self._changed_while_scanning[name] = version

    def _retire(self, name: str) -> None:
        self._retirements[name] += 1
        for key, resident in list(self._resident.items()):
            if key[0] == name:
                resident.retired = True
                if resident.refs == 0:
                    self._drop(key)

    # -- resolution ------------------------------------------------------------------------------
    async def resolve(self, ref: str) -> tuple[str, int]:
        """The (name, version) a reference serves, nothing loaded; raises AdapterNotFound or ValueError."""
        name, version = parse_ref(ref)
        if version is None:
            return name, await self._current(name)
        if (name, version) not in self._resident:
            try:
                await asyncio.to_thread(self.version_facts, name, version)
            except NotFound as e:
                raise AdapterNotFound(str(e)) from None
        return name, version

    async def acquire(self, ref: str) -> Lease:
        """Resolve and pin an adapter; raises AdapterNotFound, AdapterIncompatible or ValueError."""
        name, version = parse_ref(ref)
        key = (name, version or await self._current(name))  # a pinned version's load finds out if it exists
        resident = self._resident.get(key)
        if resident is not None and not resident.retired:
            self._resident.move_to_end(key)
            if self.metrics:
                self.metrics.adapter_cache_hits.inc()
        else:
            resident = await self._load_once(key)
        resident.refs += 1
        resident.last_used = time.time()
        self._evict()
        return Lease(self, resident)

    async def _current(self, name: str) -> int:
        return self.catalog.get(name) or await self._look_up(name)

    async def _look_up(self, name: str) -> int:
        """The current version of a name the catalog lacks: maybe published by another replica since the
        last sync. A miss is remembered until the next sync, for a sync interval at most, so that requests
        naming an unknown adapter cost the store one lookup per interval, not one each (on S3, a GET each)."""
        missed = self._missing.get(name)
        if missed is None or time.monotonic() - missed > self.sync_interval:  # also while syncs fail
            try:
                version = await asyncio.to_thread(self.store.current, name)
            except NotFound:
                self._missing[name] = time.monotonic()
            else:
                self.catalog[name] = version
                return version
        raise AdapterNotFound(f"adapter {name!r} not found")

    async def _load_once(self, key: tuple[str, int]) -> Resident:
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            started, retirements = time.perf_counter(), self._retirements[key[0]]
            adapter = await asyncio.to_thread(self._load, *key)
            if self.metrics:
                self.metrics.adapter_cache_misses.inc()
                self.metrics.adapter_load_seconds.observe(time.perf_counter() - started)
            # deleted while it loaded: the requests already waiting get it, no later one
            resident = Resident(adapter, retired=self._retirements[key[0]] != retirements)
            self._resident[key] = resident
            self._loads[key] += 1
            self._report()
            future.set_result(resident)
            return resident
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._loading[key]

    def _load(self, name: str, version: int) -> Adapter:
        try:
            _, data = self.store.read(name, version)
        except NotFound as e:
            raise AdapterNotFound(str(e)) from None
        try:
            adapter_file = AdapterFile.from_bytes(data, ignore_unknown=True)
            validate(adapter_file, self.model)
        except AdapterError as e:
            raise AdapterIncompatible(f"adapter {name}@{version} cannot be served: {e}") from None
        foreign = self.foreign_error(adapter_file.config.base_model_fingerprint)
        if foreign:
            raise AdapterIncompatible(f"adapter {name}@{version} cannot be served: {foreign}")
        return materialize(adapter_file, name=name, version=version, dtype=self.dtype, device=self.device)

    # -- residency -------------------------------------------------------------------------------
    def release_hold(self, resident: Resident) -> None:
        """A lease ends (Lease.release calls this): drop the hold, then the adapter too if its name was
        deleted meanwhile, or whatever the budget no longer fits."""
        resident.refs -= 1
        key = (resident.adapter.name, resident.adapter.version)
        if resident.refs == 0 and resident.retired and self._resident.get(key) is resident:
            self._drop(key)
        else:
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used, unused adapters while over the byte or count budget."""
        for key, resident in list(self._resident.items()):
            if self.resident_bytes <= self.max_bytes and len(self._resident) <= self.max_count:
                return
            if resident.refs == 0:
                self._drop(key)
                if self.metrics:
                    self.metrics.adapter_evictions.inc()

    def _drop(self, key: tuple[str, int]) -> None:
        del self._resident[key]
        self._report()

    @property
    def resident_bytes(self) -> int:
        return sum(r.adapter.nbytes for r in self._resident.values())

    def foreign_error(self, adapter_fingerprint: str) -> str | None:
        """Why an adapter with this fingerprint must not be served here, or None if it may be."""
        if self.allow_foreign or fingerprint_status(adapter_fingerprint, self.fingerprint) != FOREIGN:
            return None
        return (
            f"it was trained on another base model: its base_model_fingerprint {adapter_fingerprint} differs from "
            f"the served model's {self.fingerprint} (allow_foreign_adapters serves it anyway)"
        )

    def is_resident(self, name: str, version: int) -> bool:
        return (name, version) in self._resident

    def loading_names(self) -> set[str]:
        """Names of the adapters being loaded for requests (a scrape may read it from another thread)."""
        return {name for name, _ in list(self._loading)}

    def resident_report(self) -> list[ResidentReport]:
        """Every resident adapter version, most recently used first."""
        reports = [
            ResidentReport(name, version, r.adapter.nbytes, self._loads[name, version], r.last_used, r.refs)
            for (name, version), r in self._resident.items()
        ]
        return sorted(reports, key=lambda report: report.last_used, reverse=True)

    def _report(self) -> None:
        if self.metrics:
            counts = self.fingerprint_counts()
            self.metrics.adapters_foreign.set(counts[FOREIGN])
            self.metrics.adapters_unverified.set(counts[UNVERIFIED])
            self.metrics.adapters_stored.set(len(self.catalog))
            self.metrics.adapters_resident.set(len(self._resident))
            self.metrics.adapter_resident_bytes.set(self.resident_bytes)
