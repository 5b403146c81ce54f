"""The adapter lifecycle over HTTP: compare-and-swap with ETags, base-model fingerprints,
provenance and lineage, residency reports."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from server.tiny_models import random_adapter_file
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
