"""The adapter registry: resolution, LRU residency under budgets, in-use protection, single loads."""

import asyncio

import pytest

from server.adapters.model_shape import ModelShape
from server.adapters.random_adapters import random_adapter_file
from server.adapters.registry import AdapterNotFound, AdapterRegistry, parse_ref
from server.adapters.store import AdapterStore, InvalidName
from server.metrics import Metrics

SHAPE = ModelShape(num_layers=4, hidden_size=32)


def data(seed: int, rank: int = 4) -> bytes:
    return random_adapter_file("loreft", (1, 2), rank, "f1+l1", 32, seed=seed).to_bytes()


@pytest.fixture
def store(tmp_path):
    store = AdapterStore(tmp_path)
    for i in range(4):
        store.publish(f"a{i}", data(i))
    return store


def run(coro):
    return asyncio.run(coro)


def test_parse_ref():
    assert parse_ref("name") == ("name", None)
    assert parse_ref("name@12") == ("name", 12)
    for bad in ("name@0", "name@x", "name@-1", "name@" + "9" * 300, "name@1000000000", "name@²"):
        with pytest.raises(ValueError):
            parse_ref(bad)
    with pytest.raises(InvalidName):
        parse_ref("../x")


def test_lru_eviction_by_count_spares_adapters_in_use(store):
    async def body():
        registry = AdapterRegistry(store, SHAPE, max_count=2, metrics=Metrics())
        await registry.refresh()
        held = await registry.acquire("a0")
        for name in ("a1", "a2", "a3"):
            (await registry.acquire(name)).release()
        resident = {key[0] for key in registry._resident}
        assert "a0" in resident, "an adapter in use is never evicted"
        assert len(resident) == 2 and "a3" in resident
        held.release()
        (await registry.acquire("a1")).release()
        assert {key[0] for key in registry._resident} == {"a3", "a1"}
        assert registry.metrics.adapter_evictions._value.get() >= 2

    run(body())


def test_byte_budget(store):
    async def body():
        registry = AdapterRegistry(store, SHAPE, max_bytes=1)  # smaller than any adapter
        lease = await registry.acquire("a0")
        assert registry.is_resident("a0", 1), "over budget while in use: kept"
        lease.release()
        assert not registry._resident, "unused and over budget: evicted"

    run(body())


def test_concurrent_requests_load_once(store):
    loads = []

    async def body():
        registry = AdapterRegistry(store, SHAPE)
        original = registry._load
        registry._load = lambda *key: loads.append(key) or original(*key)
        leases = await asyncio.gather(*(registry.acquire("a2") for _ in range(10)))
        assert len({id(lease.adapter) for lease in leases}) == 1
        for lease in leases:
            lease.release()

    run(body())
    assert loads == [("a2", 1)]


def test_versions_and_hot_swap_and_delete(store):
    async def body():
        registry = AdapterRegistry(store, SHAPE)
        await registry.refresh()
        old = await registry.acquire("a1")
        registry.published("a1", store.publish("a1", data(10)))
        new = await registry.acquire("a1")
        assert (old.adapter.version, new.adapter.version) == (1, 2)
        assert (await registry.acquire("a1@1")).adapter is old.adapter
        store.delete("a1")
        registry.deleted("a1")
        with pytest.raises(AdapterNotFound):
            await registry.acquire("a1")
        assert old.adapter.version == 1, "a running request keeps its adapter after a delete"
        old.release()
        new.release()
        with pytest.raises(AdapterNotFound):
            await registry.acquire("nope")

    run(body())


def test_sync_picks_up_other_processes_changes(store):
    async def body():
        registry = AdapterRegistry(store, SHAPE)
        await registry.refresh()
        other = AdapterStore(store.root)  # another process's view of the same directory
        other.publish("fresh", data(20))
        other.publish("a0", data(21))
        other.delete("a3")
        await registry.refresh()
        assert registry.catalog["fresh"] == 1 and registry.catalog["a0"] == 2 and "a3" not in registry.catalog

    run(body())


def test_a_local_publish_during_a_sync_is_not_undone_by_its_stale_read(store):
    """The sync reads the store in a thread; a publish on this replica that lands meanwhile is newer than
    that read (seen as a flake: a replica served its previous version right after its own publish)."""
    import threading

    async def body():
        registry = AdapterRegistry(store, SHAPE)
        await registry.refresh()
        read, resume = threading.Event(), threading.Event()
        real_scan = registry._scan

        def slow_scan():
            snapshot = real_scan()  # taken before the publish below
            read.set()
            resume.wait(10)
            return snapshot

        registry._scan = slow_scan
        syncing = asyncio.create_task(registry.refresh())
        await asyncio.to_thread(read.wait, 10)
        version = store.publish("a1", data(11))
        registry.published("a1", version)
        registry.deleted("a2")
        store.delete("a2")
        resume.set()
        await syncing
        return version, registry.catalog

    version, catalog = run(body())
    assert catalog["a1"] == version == 2 and "a2" not in catalog


def test_a_version_deleted_while_it_loads_serves_only_the_requests_already_waiting(tmp_path):
    """A request for victim@1 is reading its bytes when the name is deleted: that request gets it, no
    later request for victim@1 does (it stayed resident and served from memory before)."""
    import threading

    store = AdapterStore(tmp_path)
    store.publish("victim", data(1))
    read_done, go = threading.Event(), threading.Event()
    real_read = store.read

    def slow_read(name, version=None):
        result = real_read(name, version)
        read_done.set()
        go.wait(10)
        return result

    async def body():
        registry = AdapterRegistry(store, SHAPE)
        await registry.refresh()
        store.read = slow_read
        loading = asyncio.ensure_future(registry.acquire("victim@1"))
        await asyncio.to_thread(read_done.wait, 10)
        await asyncio.to_thread(store.delete, "victim")  # as DELETE /v1/adapters/victim does
        registry.deleted("victim")
        go.set()
        (await loading).release()
        store.read = real_read
        with pytest.raises(AdapterNotFound):
            await registry.acquire("victim@1")
        assert registry.resident_report() == []

    run(body())


def test_one_unreadable_name_keeps_its_version_and_stops_no_other_names_sync(store, monkeypatch):
    async def body():
        registry = AdapterRegistry(store, SHAPE)
        store.publish("broken", data(3))
        await registry.refresh()
        assert registry.catalog["broken"] == 1 and registry.catalog["a0"] == 1
        real_current = store.current_or_none

        def current_or_none(name):
            if name == "broken":
                raise OSError("a flaky volume")
            return real_current(name)

        monkeypatch.setattr(store, "current_or_none", current_or_none)
        store.publish("a0", data(4))
        store.publish("fresh", data(5))
        await registry.refresh()
        assert registry.catalog == {"a0": 2, "a1": 1, "a2": 1, "a3": 1, "broken": 1, "fresh": 1}

    run(body())


@pytest.fixture
def lookups(store, monkeypatch) -> list[str]:
    """The names `store.current` is asked for, in order."""
    asked = []
    real_current = store.current
    monkeypatch.setattr(store, "current", lambda name: asked.append(name) or real_current(name))
    return asked


def test_an_unknown_name_costs_one_store_lookup_per_sync_and_a_publish_ends_the_miss(store, lookups):
    """Requests naming an adapter nobody published must not each cost a store request (on S3, a GET)."""

    async def body():
        registry = AdapterRegistry(store, SHAPE, sync_interval=60)
        await registry.refresh()
        for _ in range(5):
            with pytest.raises(AdapterNotFound):
                await registry.acquire("typo")
        assert lookups == ["typo"]
        AdapterStore(store.root).publish("typo", data(7))  # another replica
        with pytest.raises(AdapterNotFound):
            await registry.acquire("typo")  # seen at the next sync, as any other replica's change
        await registry.refresh()
        (await registry.acquire("typo")).release()
        registry.deleted("late")
        with pytest.raises(AdapterNotFound):
            await registry.acquire("late")
        registry.published("late", store.publish("late", data(8)))  # this replica's own publish
        (await registry.acquire("late")).release()
        assert lookups == ["typo", "late"]

    run(body())


def test_a_miss_is_looked_up_again_after_a_sync_interval_even_while_syncs_fail(store, lookups):
    async def body():
        registry = AdapterRegistry(store, SHAPE, sync_interval=0.05)
        for _ in range(2):
            with pytest.raises(AdapterNotFound):
                await registry.acquire("late")
        await asyncio.sleep(0.1)  # no sync ran: the listing may be down while single reads work
        AdapterStore(store.root).publish("late", data(9))
        (await registry.acquire("late")).release()
        assert lookups == ["late", "late"]

    run(body())
