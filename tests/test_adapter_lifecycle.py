"""The adapter lifecycle over HTTP: compare-and-swap with ETags, base-model fingerprints,
provenance and lineage, residency reports."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.torch import save

from server.adapters import config_json
from server.adapters.format import AdapterFile
from server.adapters.random_adapters import random_adapter_file
from server.reft.config import AdapterConfig
from tests.api_utils import ADMIN, error_of, running_app, upload

HIDDEN = 128  # the tiny Llama


def adapter_bytes(seed: int, layers=(0, 2)) -> bytes:
    return random_adapter_file("loreft", layers, 4, "f2+l2", HIDDEN, seed=seed).to_bytes()


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with running_app(tiny_model_dir("llama"), tmp_path_factory.mktemp("store")) as client:
        yield client


def conditional_upload(client, name: str, data: bytes, **headers):
    files = {"file": ("adapter.safetensors", data, "application/octet-stream")}
    return client.post(f"/v1/adapters/{name}", files=files, headers={**ADMIN, **headers})


def current_etag(client, name: str) -> str:
    response = client.get(f"/v1/adapters/{name}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.headers["etag"]


# -- compare-and-swap ------------------------------------------------------------------------------
def test_etag_is_the_current_version_and_if_match_guards_every_write(client):
    created = conditional_upload(client, "cas", adapter_bytes(1), **{"If-None-Match": "*"})
    assert created.status_code == 201 and created.headers["etag"] == '"1"'
    again = conditional_upload(client, "cas", adapter_bytes(2), **{"If-None-Match": "*"})
    assert again.status_code == 412 and again.headers["etag"] == '"1"'
    assert error_of(again)["param"] == "If-None-Match" and "at version 1" in error_of(again)["message"]

    assert current_etag(client, "cas") == '"1"'
    updated = conditional_upload(client, "cas", adapter_bytes(3), **{"If-Match": '"1"'})
    assert updated.status_code == 201 and updated.json()["version"] == 2
    stale = conditional_upload(client, "cas", adapter_bytes(4), **{"If-Match": '"1"'})
    assert stale.status_code == 412 and stale.headers["etag"] == '"2"'
    assert "expected version 1" in error_of(stale)["message"]

    rolled_stale = client.put("/v1/adapters/cas/current", json={"version": 1}, headers={**ADMIN, "If-Match": '"1"'})
    assert rolled_stale.status_code == 412
    rolled = client.put("/v1/adapters/cas/current", json={"version": 1}, headers={**ADMIN, "If-Match": 'W/"2"'})
    assert rolled.status_code == 200 and rolled.headers["etag"] == '"1"' and rolled.json()["current_version"] == 1

    assert client.delete("/v1/adapters/cas", headers={**ADMIN, "If-Match": '"2"'}).status_code == 412
    detail = client.get("/v1/adapters/cas", headers=ADMIN).json()
    assert detail["versions"] == [1, 2] and detail["current_version"] == 1, "a 412 changes nothing"
    assert client.delete("/v1/adapters/cas", headers={**ADMIN, "If-Match": '"1"'}).status_code == 200
    missing = conditional_upload(client, "cas", adapter_bytes(5), **{"If-Match": "*"})
    assert missing.status_code == 412 and "etag" not in missing.headers


@pytest.mark.parametrize(
    "headers, message",
    [
        ({"If-Match": "3"}, "expected one ETag"),
        ({"If-Match": '"1", "2"'}, "expected one ETag"),
        ({"If-Match": '"9999999999"'}, "expected one ETag"),
        ({"If-None-Match": '"1"'}, "only * is supported"),
        ({"If-Match": '"1"', "If-None-Match": "*"}, "not both"),
    ],
)
def test_malformed_preconditions_are_400(client, headers, message):
    response = conditional_upload(client, "malformed", adapter_bytes(1), **headers)
    assert response.status_code == 400 and message in error_of(response)["message"]
    assert client.get("/v1/adapters/malformed", headers=ADMIN).status_code == 404


def test_concurrent_read_modify_write_cycles_each_version_published_once(client):
    upload(client, "contended", adapter_bytes(0))

    def writer(seed: int) -> list[tuple[str, int, int]]:
        outcomes = []
        for round_ in range(4):
            seen = int(current_etag(client, "contended").strip('"'))
            response = conditional_upload(
                client, "contended", adapter_bytes(seed * 10 + round_), **{"If-Match": f'"{seen}"'}
            )
            assert response.status_code in (201, 412), response.text
            made = (
                response.json()["version"] if response.status_code == 201 else int(response.headers["etag"].strip('"'))
            )
            outcomes.append(("won" if response.status_code == 201 else "lost", seen, made))
        return outcomes

    with ThreadPoolExecutor(6) as pool:
        outcomes = [o for result in pool.map(writer, range(6)) for o in result]
    won = [(seen, made) for kind, seen, made in outcomes if kind == "won"]
    lost = [(seen, now) for kind, seen, now in outcomes if kind == "lost"]
    assert len(won) + len(lost) == 24 and won
    assert all(made == seen + 1 for seen, made in won)
    assert sorted(seen for seen, _ in won) == list(range(1, len(won) + 1)), "no version was overwritten twice"
    assert all(now > seen for seen, now in lost)
    assert client.get("/v1/adapters/contended", headers=ADMIN).json()["versions"] == list(range(1, len(won) + 2))


def test_openapi_documents_the_412(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in [
        ("/v1/adapters/{name}", "post"),
        ("/v1/adapters/{name}", "delete"),
        ("/v1/adapters/{name}/current", "put"),
        ("/v1/adapters/{name}/pyreft", "post"),
    ]:
        operation = paths[path][method]
        assert "412" in operation["responses"], (path, method)
        assert "if-match" in {p["name"] for p in operation["parameters"]}
    assert "if-none-match" in {p["name"] for p in paths["/v1/adapters/{name}"]["post"]["parameters"]}


# -- base-model fingerprint ------------------------------------------------------------------------
def with_fingerprint(seed: int, fingerprint: str, **extra_config) -> bytes:
    adapter = random_adapter_file("loreft", (0, 2), 4, "f2+l2", HIDDEN, seed=seed)
    config = json.loads(adapter.config.to_json()) | {"base_model_fingerprint": fingerprint, **extra_config}
    return save(adapter.tensors, metadata={"reft": json.dumps(config)})


def test_foreign_adapters_are_refused_at_upload_and_at_load_unless_allowed(client):
    served = client.app.state.reft.registry.fingerprint
    foreign = with_fingerprint(1, "rfp1-000000000000000000000000")
    refused = upload(client, "foreign", foreign)
    assert refused.status_code == 422 and error_of(refused)["param"] == "base_model_fingerprint"
    assert "rfp1-000000000000000000000000" in error_of(refused)["message"] and served in error_of(refused)["message"]
    assert client.get("/v1/adapters/foreign", headers=ADMIN).status_code == 404

    accepted = upload(client, "foreign", foreign, allow_foreign="true")  # deliberate cross-checkpoint use
    assert accepted.status_code == 201
    assert client.get("/v1/adapters/foreign", headers=ADMIN).json()["fingerprint_status"] == "foreign"
    generated = client.post("/v1/generate", json={"prompt": "x", "adapter": "foreign", "max_new_tokens": 1})
    assert generated.status_code == 422 and served in error_of(generated)["message"]

    assert upload(client, "unverified", adapter_bytes(2)).status_code == 201
    assert upload(client, "verified", with_fingerprint(3, served)).status_code == 201
    statuses = {a["name"]: a["fingerprint_status"] for a in client.get("/v1/adapters", headers=ADMIN).json()}
    assert statuses["unverified"] == "unverified" and statuses["verified"] == "verified"
    ready = client.get("/ready").json()["adapters"]
    assert ready["foreign"] == 1 and ready["unverified"] >= 1 and ready["verified"] >= 1
    metrics = client.get("/metrics").text
    assert "reft_adapters_foreign 1.0" in metrics and f"reft_adapters_unverified {ready['unverified']}.0" in metrics
    assert client.post("/v1/generate", json={"prompt": "x", "adapter": "verified", "max_new_tokens": 1}).is_success
    assert client.delete("/v1/adapters/foreign", headers=ADMIN).status_code == 200


def test_a_server_allowing_foreign_adapters_serves_them(tiny_model_dir, tmp_path):
    with running_app(tiny_model_dir("llama"), tmp_path, allow_foreign_adapters=True) as permissive:
        assert upload(permissive, "foreign", with_fingerprint(1, "rfp1-elsewhere")).status_code == 201
        generated = permissive.post("/v1/generate", json={"prompt": "x", "adapter": "foreign", "max_new_tokens": 1})
        assert generated.status_code == 200


# -- rolling upgrades: metadata keys a reader does not know ----------------------------------------
def test_stored_metadata_with_unknown_keys_is_served_but_uploads_name_them(client):
    newer = with_fingerprint(4, "", written_by_a_future_version={"x": 1})
    client.app.state.reft.store.publish("from-the-future", newer)  # as a newer replica would write it
    generated = client.post("/v1/generate", json={"prompt": "x", "adapter": "from-the-future", "max_new_tokens": 1})
    assert generated.status_code == 200
    refused = upload(client, "typo", newer)
    assert refused.status_code == 422 and "written_by_a_future_version: unknown field" in error_of(refused)["message"]


def test_a_reader_knowing_only_the_old_keys_reads_what_this_version_writes(client, monkeypatch):
    served = client.app.state.reft.registry.fingerprint
    provenance = {"dataset": {"sha256": "ab" * 32, "examples": 3}, "final_loss": 0.5}
    client.app.state.reft.store.publish("new-format", with_fingerprint(5, served, provenance=provenance))
    today = {k: v for k, v in config_json._FIELD_TYPES.items() if k not in ("base_model_fingerprint", "provenance")}
    monkeypatch.setattr(config_json, "_FIELD_TYPES", today)
    monkeypatch.setattr(AdapterConfig, "__init__", old_config_init(AdapterConfig.__init__))
    version, data = client.app.state.reft.store.read("new-format")
    config = AdapterFile.from_bytes(data, ignore_unknown=True).config
    assert config.base_model_fingerprint == "" and config.provenance == {} and config.rank == 4


def old_config_init(new_init):
    """AdapterConfig as it was before fingerprints and provenance: those keyword arguments do not exist."""

    def init(self, *args, **kwargs):
        for name in ("base_model_fingerprint", "provenance"):
            assert name not in kwargs, f"an old reader cannot take {name}"
        new_init(self, *args, **kwargs)

    return init


# -- residency -----------------------------------------------------------------------------------------
def test_resident_adapters_are_listed_and_exported_within_the_series_cap(tiny_model_dir, tmp_path):
    with running_app(tiny_model_dir("llama"), tmp_path, max_resident_adapters=2) as small:
        for i in range(3):
            upload(small, f"r{i}", adapter_bytes(10 + i))
            for _ in range(i + 1):
                small.post("/v1/generate", json={"prompt": "x", "adapter": f"r{i}", "max_new_tokens": 1})
        resident = small.get("/v1/adapters?resident=true", headers=ADMIN).json()
        assert [(r["name"], r["version"], r["loads"], r["in_use"]) for r in resident] == [
            ("r2", 1, 1, 0),
            ("r1", 1, 1, 0),
        ]
        assert all(r["bytes"] > 0 and r["last_used"] > 0 for r in resident)
        assert resident[0]["last_used"] >= resident[1]["last_used"]
        small.post("/v1/generate", json={"prompt": "x", "adapter": "r0", "max_new_tokens": 1})  # evicted, loads again
        again = {r["name"]: r["loads"] for r in small.get("/v1/adapters?resident=true", headers=ADMIN).json()}
        assert again == {"r0": 2, "r2": 1}
        series = [
            line for line in small.get("/metrics").text.splitlines() if line.startswith("reft_adapter_resident_info")
        ]
        assert sorted(series) == [
            'reft_adapter_resident_info{adapter="r0",version="1"} 1.0',
            'reft_adapter_resident_info{adapter="r2",version="1"} 1.0',
        ]
