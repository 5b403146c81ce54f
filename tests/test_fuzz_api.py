"""Fuzzing the generation routes: whatever the body, the answer is a JSON 2xx/4xx, never a 500,
and the engine keeps serving."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api_utils import running_app
from tests.conftest import FIXTURE

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
GENERATE_KEYS = [
    "prompt",
    "input_ids",
    "adapter",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "stream",
]
OPENAI_KEYS = ["model", "prompt", "messages", "max_tokens", "temperature", "n", "stream", "stop", "logprobs", "seed"]


def bodies(keys):
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), VALUES, max_size=6)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with running_app(FIXTURE / "model", tmp_path_factory.mktemp("store"), max_model_len=64) as client:
        yield client


def check(response):
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=bodies(GENERATE_KEYS))
def test_generate_never_500(client, body):
    body.setdefault("max_new_tokens", 2)
    check(
        client.post(
            "/v1/generate", content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"}
        )
    )


@FUZZ
@given(body=bodies(OPENAI_KEYS), route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_openai_routes_never_500(client, body, route):
    body.setdefault("max_tokens", 2)
    check(client.post(route, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=64))
def test_raw_bytes_never_500(client, raw):
    check(client.post("/v1/generate", content=raw, headers={"content-type": "application/json"}))


def test_still_serving_after_the_fuzz(client):
    response = client.post("/v1/generate", json={"prompt": "still alive", "max_new_tokens": 3})
    assert response.status_code == 200 and len(response.json()["token_ids"]) == 3
    assert client.get("/ready").status_code == 200
