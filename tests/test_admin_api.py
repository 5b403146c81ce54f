"""The admin API: auth, hot swap while a request runs, roll back, delete, concurrent uploads, every
rejected upload (status, message, store unchanged), and the limits of a strict deployment."""

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save

from server.adapters.format import AdapterFile
from server.adapters.materialize import materialize
from server.adapters.random_adapters import random_adapter_file
from server.reft.reference import reference_generate
from server.tokenization import encode_prompt
from tests.api_utils import ADMIN, error_of, running_app, sse_events, tar_directory, upload
from tests.conftest import FIXTURE, load_reference_model

HIDDEN, LAYERS = 192, 6  # the fixture model


def adapter_bytes(seed: int, **overrides) -> bytes:
    spec = {"kind": "loreft", "layers": (1, 4), "rank": 4, "positions": "f2+l2", "hidden_size": HIDDEN, **overrides}
    return random_adapter_file(seed=seed, **spec).to_bytes()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with running_app(FIXTURE / "model", tmp_path_factory.mktemp("store")) as client:
        yield client


@pytest.fixture(scope="module")
def reference():
    model = load_reference_model(FIXTURE / "model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURE / "model")

    def generate(prompt: str, data: bytes | None, max_new_tokens: int) -> list[int]:
        adapter = materialize(AdapterFile.from_bytes(data), name="ref") if data else None
        return reference_generate(model, encode_prompt(tokenizer, prompt), adapter, max_new_tokens=max_new_tokens)

    return generate


def store_snapshot(client) -> tuple:
    listing = client.get("/v1/adapters", headers=ADMIN).json()
    root = client.app.state.reft.store.root
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts)
    return json.dumps(listing, sort_keys=True), files


# -- auth ------------------------------------------------------------------------------------------
def test_admin_routes_need_the_token(client):
    assert client.get("/v1/adapters").status_code == 401
    assert client.get("/v1/adapters", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert upload(client, "x", adapter_bytes(0), headers={}).status_code == 401
    assert client.delete("/v1/adapters/x").status_code == 401
    assert client.get("/v1/adapters", headers=ADMIN).status_code == 200


def test_admin_is_closed_without_a_token_unless_opened(tmp_path):
    with running_app(FIXTURE / "model", tmp_path / "a", admin_token=None) as closed:
        response = closed.get("/v1/adapters")
        assert response.status_code == 403 and "REFT_ADMIN_TOKEN" in error_of(response)["message"]
    with running_app(FIXTURE / "model", tmp_path / "b", admin_token=None, admin_open=True) as opened:
        assert opened.get("/v1/adapters").status_code == 200


# -- lifecycle ---------------------------------------------------------------------------------------
def test_upload_hot_swap_roll_back_delete(client, reference):
    v1, v2 = adapter_bytes(1), adapter_bytes(2, layers=(0, 2, 5), rank=8, positions="f3+l3")
    first = upload(client, "swap", v1)
    assert first.status_code == 201 and first.json()["version"] == 1
    prompt, long_run = "The hot swap starts now", 300
    old_tokens: list[int] = []
    started = threading.Event()

    def long_request():
        body = {"prompt": prompt, "adapter": "swap", "max_new_tokens": long_run, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/generate", json=body) as response:
            for event in sse_events(response.iter_lines()):
                if event != "[DONE]":
                    old_tokens.extend(event["token_ids"])
                    started.set()

    runner = threading.Thread(target=long_request)
    runner.start()
    assert started.wait(60)
    second = upload(client, "swap", v2)  # published while the long request runs on v1
    assert second.status_code == 201 and second.json()["version"] == 2
    new = client.post("/v1/generate", json={"prompt": prompt, "adapter": "swap", "max_new_tokens": 12})
    runner.join(120)
    assert len(old_tokens) == long_run
    assert old_tokens == reference(prompt, v1, long_run), "the running request must finish on v1"
    assert new.json()["adapter"] == {"name": "swap", "version": 2}
    assert new.json()["token_ids"] == reference(prompt, v2, 12)

    detail = client.get("/v1/adapters/swap", headers=ADMIN).json()
    assert detail["current_version"] == 2 and detail["versions"] == [1, 2]
    assert detail["details"][1]["layers"] == [0, 2, 5] and detail["details"][1]["rank"] == 8

    rolled = client.put("/v1/adapters/swap/current", json={"version": 1}, headers=ADMIN)
    assert rolled.status_code == 200 and rolled.json()["current_version"] == 1
    back = client.post("/v1/generate", json={"prompt": prompt, "adapter": "swap", "max_new_tokens": 12}).json()
    assert back["adapter"]["version"] == 1 and back["token_ids"] == reference(prompt, v1, 12)
    assert client.put("/v1/adapters/swap/current", json={"version": 9}, headers=ADMIN).status_code == 404

    assert client.delete("/v1/adapters/swap", headers=ADMIN).json() == {"name": "swap", "deleted": True}
    gone = client.post("/v1/generate", json={"prompt": prompt, "adapter": "swap"})
    assert gone.status_code == 404 and "not found" in error_of(gone)["message"]
    assert client.get("/v1/adapters/swap", headers=ADMIN).status_code == 404
    assert client.delete("/v1/adapters/swap", headers=ADMIN).status_code == 404
    assert "swap" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    again = upload(client, "swap", v1)
    assert again.json()["version"] == 3, "version numbers never repeat, so name@version stays unambiguous"


def test_absurd_version_numbers_get_4xx_not_500(client):
    upload(client, "pirate", adapter_bytes(3))
    huge = "9" * 200  # within the schema's 256 characters for a reference: the version check answers
    generated = client.post("/v1/generate", json={"prompt": "arr", "adapter": f"pirate@{huge}", "max_new_tokens": 1})
    assert generated.status_code == 400 and "invalid adapter version" in error_of(generated)["message"]
    rolled = client.put("/v1/adapters/pirate/current", json={"version": int(huge)}, headers=ADMIN)
    assert rolled.status_code == 400 and error_of(rolled)["param"] == "version"
    missing = client.put("/v1/adapters/pirate/current", json={"version": 10**9 - 1}, headers=ADMIN)
    assert missing.status_code == 404 and "has no version" in error_of(missing)["message"]
    assert client.get("/v1/adapters/pirate", headers=ADMIN).json()["current_version"] == 1


def test_listing_shows_versions_size_type_layers_rank_loaded(client):
    upload(client, "listed", adapter_bytes(5, kind="noreft", layers=(3,), rank=2))
    client.post("/v1/generate", json={"prompt": "load it", "adapter": "listed", "max_new_tokens": 1})
    entry = next(a for a in client.get("/v1/adapters", headers=ADMIN).json() if a["name"] == "listed")
    assert entry["type"] == "noreft" and entry["layers"] == [3] and entry["rank"] == 2
    assert entry["current_version"] == 1 and entry["versions"] == [1] and entry["size"] > 0 and entry["loaded"]


def test_concurrent_uploads_of_one_name_make_distinct_versions(client):
    payloads = [adapter_bytes(100 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda data: upload(client, "race", data), payloads))
    assert all(r.status_code == 201 for r in responses)
    assert sorted(r.json()["version"] for r in responses) == list(range(1, 9))
    store = client.app.state.reft.store

    def fingerprint(data: bytes) -> bytes:
        adapter = AdapterFile.from_bytes(data)  # a torn or partial file would fail to parse here
        return b"".join(adapter.tensors[name].numpy().tobytes() for name in sorted(adapter.tensors))

    stored = {fingerprint(store.read("race", version)[1]) for version in range(1, 9)}
    assert stored == {fingerprint(p) for p in payloads}, "every version is exactly one complete upload"


def test_upload_with_metadata_as_a_form_field(client):
    adapter = random_adapter_file("direft", (2,), 4, "f1+l1", HIDDEN, share_weights=False, seed=9)
    bare = save({name: t.contiguous() for name, t in adapter.tensors.items()})  # no metadata in the header
    response = upload(client, "formed", bare, metadata=adapter.config.to_json())
    assert response.status_code == 201 and response.json()["type"] == "direft"


def test_pyreft_upload_zip_without_config_json(client, tmp_path):
    import zipfile

    archive = tmp_path / "ckpt.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in (FIXTURE / "adapters" / "nodi_l4_l3").glob("intkey_*.bin"):
            z.write(path, f"run/checkpoint-100/{path.name}")
    response = client.post(
        "/v1/adapters/nodi/pyreft",
        files={"archive": ("ckpt.zip", archive.read_bytes())},
        data={"positions": "l3", "share_weights": "true", "intervention_type": "nodireft", "layers": "4", "rank": "8"},
        headers=ADMIN,
    )
    assert response.status_code == 201, response.text
    case = next(c for c in json.loads((FIXTURE / "expected.json").read_text())["cases"] if c["adapter"] == "nodi_l4_l3")
    out = client.post(
        "/v1/generate",
        json={"input_ids": case["prompt_ids"], "adapter": "nodi", "max_new_tokens": 24, "ignore_eos": True},
    )
    assert out.json()["token_ids"] == case["adapter_tokens"]


# -- rejected uploads ------------------------------------------------------------------------------
def _nan_adapter() -> bytes:
    adapter = random_adapter_file("loreft", (1,), 4, "f1", HIDDEN)
    adapter.tensors["layers.1.0.weight"][0, 0] = float("nan")
    return save(adapter.tensors, metadata={"reft": adapter.config.to_json()})


def _unknown_type() -> bytes:
    adapter = random_adapter_file("loreft", (1,), 4, "f1", HIDDEN)
    config = json.loads(adapter.config.to_json()) | {"type": "superreft"}
    return save(adapter.tensors, metadata={"reft": json.dumps(config)})


REJECTED = [
    ("garbage", lambda: b"this is not a safetensors file at all", {}, 422, "file: "),
    ("hidden", lambda: adapter_bytes(1, hidden_size=128), {}, 422, "adapter has hidden_size 128, the model has 192"),
    ("layer", lambda: adapter_bytes(1, layers=(6,)), {}, 422, "layer 6 out of range: the model has 6 layers"),
    ("nan", _nan_adapter, {}, 422, "NaN or infinite"),
    ("type", _unknown_type, {}, 422, "unknown intervention type 'superreft'"),
    ("bare", lambda: save({"x": torch.zeros(2)}), {}, 422, "no 'reft' metadata"),
    ("meta", lambda: adapter_bytes(1), {"metadata": "{not json"}, 400, "metadata: not valid JSON"),
    ("empty", lambda: b"", {}, 400, "the file is empty"),
]


@pytest.mark.parametrize("name, make, form, status, message", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_uploads_leave_the_store_unchanged(client, name, make, form, status, message):
    before = store_snapshot(client)
    response = upload(client, f"rejected-{name}", make(), **form)
    assert response.status_code == status, response.text
    assert message in error_of(response)["message"]
    assert store_snapshot(client) == before


def test_invalid_adapter_names_are_refused(client):
    before = store_snapshot(client)
    for name in ("..", ".hidden", "a" * 65, "with space", "semi;colon"):
        response = upload(client, name, adapter_bytes(1))
        assert response.status_code in (400, 404, 405), (name, response.status_code)
        if response.status_code == 400:
            assert "invalid adapter name" in error_of(response)["message"]
    assert store_snapshot(client) == before


def _tar_with(name: str, data: bytes) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _pickle_with_code() -> bytes:
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch /tmp/reft-pwned",))

    return _tar_with("intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin", pickle.dumps({"weight": Exploit()}))


PYREFT_REJECTED = [
    ("not-archive", lambda: b"plain bytes", 422, "neither a zip nor a tar"),
    ("traversal", lambda: _tar_with("../intkey_x#0.bin", b"x"), 422, "unsafe path"),
    ("no-files", lambda: _tar_with("README", b"hello"), 422, "no pyreft checkpoint files"),
    ("no-type", lambda: _tar_with("intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin", b"x"), 422, "needs the"),
    ("pickle", _pickle_with_code, 422, "cannot be read safely"),
]


@pytest.mark.parametrize("name, make, status, message", PYREFT_REJECTED, ids=[r[0] for r in PYREFT_REJECTED])
def test_rejected_pyreft_archives(client, name, make, status, message):
    before = store_snapshot(client)
    form = {"positions": "f1+l1", "share_weights": "true"} | (
        {"intervention_type": "loreft"} if name == "pickle" else {}
    )
    response = client.post(
        f"/v1/adapters/bad-{name}/pyreft", files={"archive": ("a.tar.gz", make())}, data=form, headers=ADMIN
    )
    assert response.status_code == status, response.text
    assert message in error_of(response)["message"]
    assert store_snapshot(client) == before
    assert not os.path.exists("/tmp/reft-pwned")


def test_pyreft_import_with_wrong_arguments(client):
    archive = tar_directory(FIXTURE / "adapters" / "lo_l14_f3l3_unshared")
    for data, message in [
        ({"positions": "f3+l3", "share_weights": "true"}, "share_weights=True needs 1"),
        ({"positions": "middle", "share_weights": "false"}, "invalid positions"),
        ({"share_weights": "false"}, "positions"),
        ({"positions": "f3+l3", "share_weights": "false", "layers": "1,four"}, "invalid layers '1,four'"),
        ({"positions": "f3+l3", "share_weights": "false", "layers": "all"}, "checkpoint has layers [1, 4], not [0, 1"),
    ]:
        response = client.post(
            "/v1/adapters/args/pyreft", files={"archive": ("a.tgz", archive)}, data=data, headers=ADMIN
        )
        assert response.status_code in (400, 422) and message in error_of(response)["message"], response.text


# -- a strict deployment: API key, tiny queue, small uploads ---------------------------------------
@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    with running_app(
        FIXTURE / "model",
        tmp_path_factory.mktemp("strict"),
        api_key="user-key",
        max_num_seqs=1,
        max_queue=0,
        max_upload_size=4096,
    ) as client:
        yield client


USER = {"Authorization": "Bearer user-key"}


def test_generation_routes_need_the_api_key(strict):
    body = {"prompt": "hi", "max_new_tokens": 2}
    assert strict.post("/v1/generate", json=body).status_code == 401
    assert strict.post("/v1/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert strict.post("/v1/generate", json=body, headers=USER).status_code == 200
    assert strict.get("/v1/models").status_code == 401
    assert strict.get("/health").status_code == 200 and strict.get("/ready").status_code == 200


def test_overload_gets_429_with_retry_after(strict):
    started = threading.Event()
    done = []

    def hog():
        body = {"prompt": "hog", "max_new_tokens": 400, "ignore_eos": True, "stream": True}
        with strict.stream("POST", "/v1/generate", json=body, headers=USER) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    started.set()
        done.append(True)

    runner = threading.Thread(target=hog)
    runner.start()
    assert started.wait(60)
    response = strict.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers=USER)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1" and "overloaded" in error_of(response)["message"]
    runner.join(120)
    assert done
    time.sleep(0.1)
    assert strict.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers=USER).status_code == 200
    assert 'reft_requests_rejected_total{reason="overloaded"} 1.0' in strict.get("/metrics").text


def test_uploads_over_the_limit_get_413(strict):
    before = store_snapshot(strict)
    response = upload(strict, "big", adapter_bytes(1, rank=16))
    assert response.status_code == 413 and "upload limit" in error_of(response)["message"]
    huge = upload(strict, "huge", b"\0" * 300_000)  # over the limit plus form overhead: refused before parsing
    assert huge.status_code == 413 and "larger than the limit" in error_of(huge)["message"]
    assert store_snapshot(strict) == before


def adapter_with_config(seed: int, **extra) -> bytes:
    adapter = random_adapter_file("loreft", (1, 4), 4, "f2+l2", HIDDEN, seed=seed)
    config = json.loads(adapter.config.to_json()) | extra
    return save(adapter.tensors, metadata={"reft": json.dumps(config)})


def nested(depth: int) -> dict:
    root = node = {}
    for _ in range(depth - 1):
        node["a"] = {}
        node = node["a"]
    return root


@pytest.mark.parametrize("depth", [300, 600])
def test_a_deeply_nested_provenance_is_refused_with_a_422(client, depth):
    """Deeper than 32 levels would fail to serialise when shown (300 levels) or when written (600)."""
    refused = upload(client, f"deep{depth}", adapter_with_config(2, provenance=nested(depth)))
    assert refused.status_code == 422 and error_of(refused)["param"] == "provenance", refused.text
    accepted = upload(client, "deep32", adapter_with_config(2, provenance=nested(32)))
    assert accepted.status_code == 201
    assert client.get("/v1/adapters/deep32", headers=ADMIN).status_code == 200


@pytest.mark.parametrize("route", ["/v1/adapters/racing", "/v1/adapters"])
def test_show_and_list_during_a_concurrent_delete_answer_without_a_500(client, route, monkeypatch):
    """Another admin's DELETE lands between a GET's read of the name's versions and of their headers."""
    assert upload(client, "racing", adapter_with_config(5)).status_code == 201
    store = client.app.state.reft.store
    real_info = store.info

    def info_then_deleted(name):
        result = real_info(name)
        if name == "racing":
            store.delete(name)
        return result

    monkeypatch.setattr(store, "info", info_then_deleted)
    answer = client.get(route, headers=ADMIN)
    assert answer.status_code in (200, 404), answer.text


def test_two_uploads_of_a_name_reach_the_catalog_in_the_stores_order(client, monkeypatch):
    """The first upload's worker is slow to come back after its store write: the second must not serve
    first and then be overwritten by the first's report (which left v1 served until the next sync)."""
    store, registry = client.app.state.reft.store, client.app.state.reft.registry
    real_publish, first_written = store.publish, threading.Event()

    def publish(name, payload, **kwargs):
        version = real_publish(name, payload, **kwargs)
        if name == "ordered" and not first_written.is_set():
            first_written.set()
            time.sleep(1.0)  # the second upload arrives meanwhile
        return version

    monkeypatch.setattr(store, "publish", publish)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(upload, client, "ordered", adapter_bytes(11))
        first_written.wait(10)
        second = pool.submit(upload, client, "ordered", adapter_bytes(12))
        versions = [first.result().json()["version"], second.result().json()["version"]]
    assert versions == [store.current("ordered") - 1, store.current("ordered")]
    assert registry.catalog["ordered"] == store.current("ordered")
