"""The S3 backend's own guarantees, against a real S3-compatible server on loopback (tests/s3_server.py):
it refuses a store without conditional writes, a killed publisher leaves no partial version, numbers
survive deletes, and a second store instance (another replica) sees every change."""

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from server.adapters.model_shape import ModelShape
from server.adapters.object_store import ConditionalWritesUnsupported, ObjectStore
from server.adapters.random_adapters import random_adapter_file
from server.adapters.registry import AdapterRegistry
from server.adapters.store import NotFound, Precondition, StoreError
from server.adapters.stores import open_store


def data(seed: int) -> bytes:
    return random_adapter_file("loreft", (1,), 2, "f1+l1", 16, seed=seed).to_bytes()


def version_objects(s3_server, url: str) -> int:
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    return s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/blobs/")["KeyCount"]


def test_store_locations_pick_the_backend(s3_server, tmp_path):
    assert isinstance(open_store(s3_server.fresh_url()), ObjectStore)
    assert not isinstance(open_store(tmp_path / "dir"), ObjectStore)
    for bad in ("gs://bucket/x", "s3:///prefix"):
        with pytest.raises(StoreError):
            open_store(bad)


def test_a_store_ignoring_conditional_writes_is_refused(s3_server, monkeypatch):
    """Simulates a store that drops If-Match / If-None-Match (as some S3 look-alikes do)."""
    real_put = ObjectStore._call

    def unconditional(self, operation, **kwargs):
        kwargs.pop("IfMatch", None)
        kwargs.pop("IfNoneMatch", None)
        return real_put(self, operation, **kwargs)

    monkeypatch.setattr(ObjectStore, "_call", unconditional)
    with pytest.raises(ConditionalWritesUnsupported, match="does not honour conditional writes"):
        ObjectStore(s3_server.fresh_url())


def test_an_unreachable_store_is_a_clear_error(s3_server, monkeypatch):
    monkeypatch.setenv("REFT_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(OSError, match="object store s3://"):
        ObjectStore(s3_server.fresh_url())


def test_replicas_see_publishes_roll_backs_and_deletes_and_numbers_are_never_reused(s3_server):
    url = s3_server.fresh_url()
    writer, reader = ObjectStore(url), ObjectStore(url)
    assert writer.publish("pirate", data(0)) == 1 and writer.publish("pirate", data(1)) == 2
    assert reader.names() == ["pirate"] and reader.current("pirate") == 2
    assert reader.read("pirate", 1) == (1, data(0)) and reader.read("pirate")[1] == data(1)
    assert reader.read_config("pirate", 2).rank == 2
    writer.set_current("pirate", 1)
    assert reader.current("pirate") == 1 and [v.version for v in reader.info("pirate").versions] == [1, 2]
    writer.delete("pirate")
    assert reader.names() == [] and reader.versions("pirate") == []
    with pytest.raises(NotFound):
        reader.read("pirate", 1)
    assert version_objects(s3_server, url) == 0, "a delete removes the version objects"
    assert reader.publish("pirate", data(2)) == 3, "numbering continues after a delete"


SLOW_PUBLISHER = """
import sys
from server.adapters.stores import open_store
store = open_store(sys.argv[1])
print("ready", flush=True)
while True:
    store.publish("big", b"x" * 8_000_000)
"""


def test_a_publisher_killed_mid_upload_leaves_old_or_new_never_partial(s3_server):
    url = s3_server.fresh_url()
    store = ObjectStore(url)
    store.publish("big", b"x" * 8_000_000)
    publisher = subprocess.Popen([sys.executable, "-c", SLOW_PUBLISHER, url], stdout=subprocess.PIPE, text=True)
    assert publisher.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    publisher.send_signal(signal.SIGKILL)
    publisher.wait()
    current, payload = store.read("big")
    assert payload == b"x" * 8_000_000 and store.versions("big") == list(range(1, current + 1))
    for version in store.versions("big"):
        assert store.read("big", version)[1] == payload
    ObjectStore(url, orphan_age=0)  # a replica starting later sweeps what the killed publisher left
    assert version_objects(s3_server, url) == len(store.versions("big"))


def test_two_server_processes_share_one_bucket(s3_server, tiny_model_dir, tmp_path):
    """Publish, roll back, compare-and-swap and delete on one replica; the other follows within its sync interval."""
    import httpx

    from tests.api_utils import ADMIN, ADMIN_TOKEN
    from tests.server_process import ServerProcess

    url = s3_server.fresh_url()
    args = ("--model", str(tiny_model_dir("llama")), "--store", url, "--store-sync-interval", "0.3")
    args += ("--kv-cache-memory", "32MiB", "--max-model-len", "256", "--admin-token", ADMIN_TOKEN)
    adapter = random_adapter_file("loreft", (0, 2), 4, "f2+l2", 128, seed=3).to_bytes()
    with ServerProcess(tmp_path / "a.log", *args) as a, ServerProcess(tmp_path / "b.log", *args) as b:

        def served_on_b():
            request = {"prompt": "hi", "adapter": "shared", "max_new_tokens": 2}
            response = httpx.post(f"{b.url}/v1/generate", json=request)
            return response.json()["adapter"]["version"] if response.status_code == 200 else response.status_code

        def post(replica, headers):
            files = {"file": ("a.safetensors", adapter)}
            return httpx.post(f"{replica.url}/v1/adapters/shared", files=files, headers={**ADMIN, **headers})

        assert post(a, {"If-None-Match": "*"}).status_code == 201
        assert post(b, {"If-None-Match": "*"}).status_code == 412, "B sees A's name in the bucket at once"
        assert post(b, {"If-Match": '"1"'}).status_code == 201
        stale = post(a, {"If-Match": '"1"'})
        assert stale.status_code == 412 and stale.headers["etag"] == '"2"'
        assert served_on_b() == 2
        rolled = httpx.put(f"{a.url}/v1/adapters/shared/current", json={"version": 1}, headers=ADMIN)
        assert rolled.status_code == 200, rolled.text
        wait_until(lambda: served_on_b() == 1)
        assert httpx.delete(f"{a.url}/v1/adapters/shared", headers=ADMIN).status_code == 200
        wait_until(lambda: served_on_b() == 404)
        assert post(b, {}).json()["version"] == 3, "numbers are not reused after a delete"


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the other replica did not follow in time"
        time.sleep(0.1)


def lose_the_answer_of_the_first_pointer_swap(store: ObjectStore, retried: bool) -> None:
    """The first conditional PUT of a pointer is applied, but its answer is lost: botocore's retry sends it
    again (and gets 412: our own write moved the ETag), or the read timeout surfaces."""
    from botocore.exceptions import ReadTimeoutError

    real, lost = store.client.put_object, []

    def put_object(**kwargs):
        if not lost and "/pointers/" in kwargs["Key"] and "IfMatch" in kwargs:
            lost.append(real(**kwargs))
            if retried:
                return real(**kwargs)
            raise ReadTimeoutError(endpoint_url="http://s3")
        return real(**kwargs)

    store.client.put_object = put_object


@pytest.mark.parametrize("retried", [True, False], ids=["retried", "timed-out"])
def test_a_publish_whose_swap_answer_was_lost_is_served_whole(s3_server, retried):
    """The publish reports the version it became, and its object stays: deleting it would leave every
    replica serving a version without bytes."""
    url = s3_server.fresh_url()
    store = ObjectStore(url)
    assert store.publish("pirate", data(0)) == 1
    lose_the_answer_of_the_first_pointer_swap(store, retried)
    assert store.publish("pirate", data(1), precondition=Precondition(version=1)) == 2
    assert ObjectStore(url).read("pirate") == (2, data(1))


@pytest.mark.parametrize("retried", [True, False], ids=["retried", "timed-out"])
def test_a_roll_back_or_delete_whose_swap_answer_was_lost_succeeds(s3_server, retried):
    """The write was applied: the client must not hear 412 (its own write moved the version) or 404."""
    url = s3_server.fresh_url()
    store = ObjectStore(url)
    store.publish("pirate", data(0))
    store.publish("pirate", data(1))
    lose_the_answer_of_the_first_pointer_swap(store, retried)
    store.set_current("pirate", 1, precondition=Precondition(version=2))
    assert ObjectStore(url).current("pirate") == 1
    lose_the_answer_of_the_first_pointer_swap(store, retried)
    store.delete("pirate", precondition=Precondition(version=1))
    assert ObjectStore(url).names() == [] and version_objects(s3_server, url) == 0


def test_a_stray_key_under_pointers_is_passed_over(s3_server):
    """The empty "folder" key the S3 console, s3fs or rclone leave must not stop listing or a start."""
    url = s3_server.fresh_url()
    ObjectStore(url).publish("pirate", data(0))
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{prefix}/pointers/", Body=b"")
    assert ObjectStore(url).names() == ["pirate"]


def test_a_sync_reads_only_the_pointers_that_changed(s3_server):
    """A replica syncs every few seconds: unchanged names must cost no request beyond the one listing."""
    url = s3_server.fresh_url()
    writer, reader = ObjectStore(url), ObjectStore(url)
    for name in ("a", "b", "c"):
        writer.publish(name, data(0))
    registry = AdapterRegistry(reader, ModelShape(num_layers=2, hidden_size=16))
    asyncio.run(registry.refresh())
    calls = []
    real_call = ObjectStore._call
    reader._call = lambda operation, **kwargs: calls.append(kwargs["Key"]) or real_call(reader, operation, **kwargs)
    asyncio.run(registry.refresh())
    assert calls == [], "nothing changed: no pointer read"
    writer.publish("b", data(1))
    asyncio.run(registry.refresh())
    assert registry.catalog == {"a": 1, "b": 2, "c": 1}
    assert not [key for key in calls if "/pointers/" in key and not key.endswith("/pointers/b")]


def test_an_unreadable_pointer_is_reported_and_stops_neither_a_start_nor_the_other_names(s3_server):
    url = s3_server.fresh_url()
    store = ObjectStore(url)
    store.publish("good", data(0))
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{prefix}/pointers/bad", Body=b"not json")
    served = ObjectStore(url).served()
    assert served.versions == {"good": 1} and "unreadable pointer" in served.unreadable["bad"]
    reader = ObjectStore(url)
    assert reader.names() == ["bad", "good"], "listed, so that a listing can say what is wrong with it"
    with pytest.raises(OSError, match="unreadable pointer"):
        reader.info("bad")
