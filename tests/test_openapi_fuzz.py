"""schemathesis over the served OpenAPI description, admin token included: a few hundred cases from a
fixed seed, schema-conforming and schema-violating, on every operation; none may get a 5xx.
bench/fuzz_openapi.py runs the same check at scale (50,000+ cases, several workers)."""

import collections

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from tests.api_utils import ADMIN, serving_on_loopback
from tests.conftest import FIXTURE

SEED = 20240613
CASES = 300


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    with serving_on_loopback(FIXTURE / "model", tmp_path_factory.mktemp("store"), max_model_len=64) as url:
        yield url


def every_operation(schema) -> st.SearchStrategy:
    operations = [result.ok() for result in schema.get_all_operations()]
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    return st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in modes])


def test_no_case_gets_a_server_error(base_url):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    statuses: collections.Counter = collections.Counter()
    server_errors = []

    @seed(SEED)
    @settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=every_operation(schema))
    def call(case):
        response = case.call(headers=ADMIN, timeout=60)
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            server_errors.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")

    call()
    assert not server_errors, server_errors
    assert sum(statuses.values()) >= CASES and len(statuses) > 2, statuses  # it did reach several outcomes
    assert httpx.get(f"{base_url}/ready").status_code == 200  # and the engine still serves
