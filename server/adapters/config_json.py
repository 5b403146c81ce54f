"""An `AdapterConfig` from untrusted JSON (a file header, an upload's form field), checked field by field.

Every problem is an `AdapterError` naming the field, so that a bad upload gets a 4xx that points at it.
"""

from __future__ import annotations

import json

from server.adapters.dtypes import DTYPES
from server.adapters.errors import AdapterError
from server.reft.config import FORMAT_VERSION, AdapterConfig
from server.reft.interventions import INTERVENTION_TYPES, activation
from server.reft.positions import parse_positions

MAX_DIMENSION = 1 << 20  # hidden size, rank: far beyond any model, far inside what tensors can index
MAX_LAYER = 1 << 16
# objects and lists nested in `provenance`: deeper would fail to serialise when the adapter is shown
MAX_PROVENANCE_DEPTH = 32
_REQUIRED = ("type", "rank", "hidden_size", "layers", "positions")
_FIELD_TYPES = {
    "type": str,
    "rank": int,
    "hidden_size": int,
    "positions": str,
    "share_weights": bool,
    "activation": str,
    "base_model": str,
    "dtype": str,
    "format_version": int,
    "base_model_fingerprint": str,
    "provenance": dict,
}


def parse_json_object(text, field: str) -> dict:
    """A JSON object from untrusted text; whatever is wrong with it (not text, malformed, nested too
    deep for the parser, integers too long to convert) is an AdapterError naming `field`."""
    if not isinstance(text, str | bytes):
        raise AdapterError(field, f"must be a JSON string, got {type(text).__name__}")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long integers, deep nesting
        raise AdapterError(field, f"not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise AdapterError(field, "must be a JSON object")
    return raw


def config_from_json(text: str, ignore_unknown: bool = False) -> AdapterConfig:
    return config_from_dict(parse_json_object(text, "metadata"), ignore_unknown)


def config_from_dict(raw: dict, ignore_unknown: bool = False) -> AdapterConfig:
    """Build and check an AdapterConfig from untrusted JSON-like data.

    Uploads reject unknown fields (a typo must not pass silently); stored adapters are read with
    `ignore_unknown`, so a replica still serves what a newer replica wrote (rolling upgrades)."""
    for name in _REQUIRED:
        if name not in raw:
            raise AdapterError(name, "missing")
    unknown = set(raw) - set(_FIELD_TYPES) - {"layers"}
    if unknown and not ignore_unknown:
        raise AdapterError(sorted(unknown)[0], "unknown field")
    raw = {key: value for key, value in raw.items() if key not in unknown}
    for name, kind in _FIELD_TYPES.items():
        value = raw.get(name)
        if name in raw and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise AdapterError(name, f"must be {kind.__name__}, got {type(value).__name__}")
    layers = raw["layers"]
    if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise AdapterError("layers", "must be a list of integers")
    config = AdapterConfig(**{**raw, "layers": tuple(layers)})
    check_config(config)
    return config


def check_config(config: AdapterConfig) -> None:
    """Raise AdapterError naming the first field out of bounds or unknown to this server."""
    if config.format_version != FORMAT_VERSION:
        raise AdapterError("format_version", f"unsupported version {config.format_version}")
    if config.type not in INTERVENTION_TYPES:
        raise AdapterError("type", f"unknown intervention type {config.type!r}; known: {', '.join(INTERVENTION_TYPES)}")
    for name in ("rank", "hidden_size"):
        value = getattr(config, name)
        if value < 1:
            raise AdapterError(name, f"must be >= 1, got {value}")
        if value > MAX_DIMENSION:
            raise AdapterError(name, f"must be <= {MAX_DIMENSION}, got {value}")
    if config.rank > config.hidden_size:
        raise AdapterError("rank", f"{config.rank} exceeds hidden_size {config.hidden_size}")
    if not config.layers:
        raise AdapterError("layers", "must name at least one layer")
    if len(set(config.layers)) != len(config.layers):
        raise AdapterError("layers", f"duplicate layer in {list(config.layers)}")
    if min(config.layers) < 0:
        raise AdapterError("layers", f"negative layer index in {list(config.layers)}")
    if max(config.layers) > MAX_LAYER:
        raise AdapterError("layers", f"layer index over {MAX_LAYER} in {list(config.layers)}")
    try:
        parse_positions(config.positions)
    except ValueError as e:
        raise AdapterError("positions", str(e)) from None
    try:
        activation(config.activation)
    except ValueError as e:
        raise AdapterError("activation", str(e)) from None
    if config.dtype not in DTYPES:
        raise AdapterError("dtype", f"unknown dtype {config.dtype!r}; known: {', '.join(DTYPES)}")
    if _nesting(config.provenance) > MAX_PROVENANCE_DEPTH:
        raise AdapterError("provenance", f"nested deeper than {MAX_PROVENANCE_DEPTH} levels")


def _nesting(value) -> int:
    """How deep objects and lists nest in `value` (1 for a flat object), counted without recursion and
    stopping once past the limit."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_PROVENANCE_DEPTH:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
