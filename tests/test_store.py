"""The adapter store on its own: names, version bounds, crash leftovers; each test on both backends
(a directory and an S3-compatible object store) unless it is about one of them."""

import os
import time

import pytest

from server.adapters.random_adapters import random_adapter_file
from server.adapters.store import (
    MAX_VERSION,
    STALE_TMP_SECONDS,
    AdapterStore,
    InvalidName,
    NotFound,
    Precondition,
    PreconditionFailed,
)
from server.adapters.stores import open_store


def data(seed: int) -> bytes:
    return random_adapter_file("loreft", (1,), 2, "f1+l1", 16, seed=seed).to_bytes()


def test_names_are_matched_whole(store_location):
    store = open_store(store_location)
    for bad in ("abc\n", "abc\n\n", "\nabc", "a b", "../x", "", "x" * 65):
        with pytest.raises(InvalidName):
            store.publish(bad, data(0))
    assert store.names() == []


def test_absurd_version_numbers_are_not_found_not_os_errors(store_location):
    store = open_store(store_location)
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


RMW_WRITER = """
import os, sys, time
from server.adapters.store import Precondition, PreconditionFailed
from server.adapters.stores import open_store
store, data = open_store(sys.argv[1]), open(sys.argv[2], "rb").read()
while not os.path.exists(sys.argv[4]):  # start together, so that the writers really contend
    time.sleep(0.01)
for _ in range(int(sys.argv[3])):
    seen = store.current("shared")
    try:
        print("won", seen, store.publish("shared", data, precondition=Precondition(version=seen)), flush=True)
    except PreconditionFailed as e:
        print("lost", seen, e.current, flush=True)
"""


def test_read_modify_write_across_processes_never_overwrites_silently(store_location, tmp_path):
    import subprocess
    import sys

    store = open_store(store_location)
    store.publish("shared", data(0))
    payload = tmp_path / "a.safetensors"
    payload.write_bytes(data(1))
    go = tmp_path / "go"
    command = [sys.executable, "-c", RMW_WRITER, store_location, str(payload), "15", str(go)]
    writers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    go.touch()
    lines = [line.split() for writer in writers for line in writer.communicate(timeout=120)[0].splitlines()]
    won = [(int(seen), int(made)) for kind, seen, made in lines if kind == "won"]
    lost = [(int(seen), int(now)) for kind, seen, now in lines if kind == "lost"]
    assert len(won) + len(lost) == 60 and won and lost
    assert all(made == seen + 1 for seen, made in won), "a winner built on exactly the version it read"
    assert sorted(seen for seen, _ in won) == list(range(1, len(won) + 1)), "each version was replaced exactly once"
    assert all(now > seen for seen, now in lost), "a loser's version had moved on"
    assert store.versions("shared") == list(range(1, len(won) + 2))


def test_preconditions_on_roll_back_and_delete(store_location):
    store = open_store(store_location)
    with pytest.raises(PreconditionFailed, match="absent"):
        store.publish("x", data(0), precondition=Precondition(version=1))
    with pytest.raises(PreconditionFailed, match="absent"):
        store.publish("x", data(0), precondition=Precondition(exists=True))
    assert store.publish("x", data(0), precondition=Precondition(exists=False)) == 1
    with pytest.raises(PreconditionFailed, match="at version 1"):
        store.publish("x", data(1), precondition=Precondition(exists=False))
    assert store.publish("x", data(1), precondition=Precondition(version=1)) == 2
    with pytest.raises(PreconditionFailed):
        store.set_current("x", 1, Precondition(version=1))
    store.set_current("x", 1, Precondition(version=2))
    with pytest.raises(PreconditionFailed) as failed:
        store.delete("x", Precondition(version=2))
    assert failed.value.current == 1 and store.current("x") == 1
    store.delete("x", Precondition(version=1))
    assert store.names() == [] and store.versions("x") == []
