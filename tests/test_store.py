"""The adapter store on its own: names, version bounds, crash leftovers."""

import os
import time

import pytest

from server.adapters.store import MAX_VERSION, STALE_TMP_SECONDS, AdapterStore, InvalidName, NotFound
from server.tiny_models import random_adapter_file


def data(seed: int) -> bytes:
    return random_adapter_file("loreft", (1,), 2, "f1+l1", 16, seed=seed).to_bytes()


def test_names_are_matched_whole(tmp_path):
    store = AdapterStore(tmp_path)
    for bad in ("abc\n", "abc\n\n", "\nabc", "a b", "../x", "", "x" * 65):
        with pytest.raises(InvalidName):
            store.publish(bad, data(0))
    assert store.names() == []


def test_absurd_version_numbers_are_not_found_not_os_errors(tmp_path):
    store = AdapterStore(tmp_path)
    store.publish("pirate", data(0))
    for version in (int("9" * 300), MAX_VERSION + 1, 0, -1):
        with pytest.raises(NotFound):
            store.read("pirate", version)
        with pytest.raises(NotFound):
            store.set_current("pirate", version)
    assert store.current("pirate") == 1


def test_stale_leftovers_of_crashed_writers_and_deletes_are_removed_at_start(tmp_path):
    AdapterStore(tmp_path)
    tmp = tmp_path / ".tmp"
    trash = tmp / "deleted-pirate-0123"  # a delete that crashed between its rename and its rmtree
    (trash / "versions").mkdir(parents=True)
    (trash / "versions" / "000001.safetensors").write_bytes(b"x")
    partial = tmp / "abc.part"
    partial.write_bytes(b"half")
    fresh = tmp / "fresh.part"  # may belong to a publish running right now
    fresh.write_bytes(b"busy")
    old = time.time() - STALE_TMP_SECONDS - 10
    for path in (trash, partial):
        os.utime(path, (old, old))
    AdapterStore(tmp_path)  # a replica starting on this store
    assert sorted(p.name for p in tmp.iterdir()) == ["fresh.part"]
