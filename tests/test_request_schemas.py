"""The request schemas as a property: every field of every request body is bounded (integers well
inside int64, strings, lists and objects in size), any JSON value validates or gives pydantic's
ValidationError (a 400), and the engine's own check refuses what would overflow torch."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from server.api.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, SetCurrentRequest
from server.engine.sampling_params import SamplingParams

REQUESTS = [GenerateRequest, CompletionRequest, ChatCompletionRequest, SetCurrentRequest]
INT64_MAX = 2**63 - 1


def unbounded(schema: dict, definitions: dict, path: str = "") -> list[str]:
    """Paths of the JSON-schema nodes without an upper bound (integers, numbers, strings, arrays, objects)."""
    if "$ref" in schema:
        return unbounded(definitions[schema["$ref"].split("/")[-1]], definitions, path)
    found = []
    for alternative in schema.get("anyOf", []):
        found += unbounded(alternative, definitions, path)
    kind = schema.get("type")
    bound = {"integer": "maximum", "number": "maximum", "string": "maxLength", "array": "maxItems"}.get(kind)
    if bound and bound not in schema and not (kind == "string" and ("enum" in schema or "const" in schema)):
        found.append(f"{path} ({kind})")
    if kind == "integer" and schema.get("maximum", 0) > INT64_MAX:
        found.append(f"{path} (beyond int64)")
    if kind == "object":
        if "properties" not in schema and "maxProperties" not in schema:
            found.append(f"{path} (object)")
        for name, field in schema.get("properties", {}).items():
            found += unbounded(field, definitions, f"{path}.{name}")
        if isinstance(schema.get("additionalProperties"), dict):
            found += unbounded(schema["additionalProperties"], definitions, f"{path}.*")
    if kind == "array" and "items" in schema:
        found += unbounded(schema["items"], definitions, f"{path}[]")
    return found


@pytest.mark.parametrize("model", REQUESTS, ids=lambda m: m.__name__)
def test_every_request_field_is_bounded(model):
    schema = model.model_json_schema()
    assert unbounded(schema, schema.get("$defs", {}), model.__name__) == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=15,
)
FIELDS = sorted({name for model in REQUESTS for name in model.model_fields})


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(REQUESTS),
    body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON, max_size=8),
)
def test_any_body_validates_or_gives_a_validation_error(model, body):
    try:
        request = model.model_validate(body)
    except ValidationError:
        return
    if hasattr(request, "sampling"):  # whatever the schema accepts, the engine's check accepts too
        request.sampling(1, None).check()


@pytest.mark.parametrize(
    "field, value",
    [("top_k", 2**63), ("seed", 2**64), ("max_new_tokens", 2**40), ("stop_token_ids", (2**40,)), ("top_k", -1)],
)
def test_the_engine_refuses_what_would_overflow_torch(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).check()
