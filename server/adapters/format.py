"""The on-disk adapter format: one `.safetensors` file, metadata in its header.

Tensors are named `layers.<layer>.<index>.<param>`: `<index>` numbers the interventions of one layer
(0 only with shared weights; 0 = first positions and 1 = last positions without), `<param>` is a
parameter name of the intervention type (see server/reft/interventions.py). The safetensors header's
`__metadata__` holds one key, "reft", whose value is the JSON of `AdapterConfig`.

`validate()` checks a file against itself and, given one, against the base model and a bound on
parameter magnitudes (finite but huge values would overflow the edited hidden states and poison
every request batched with them); every problem is an `AdapterError` that names the offending field.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server.reft.interventions import INTERVENTION_TYPES, activation
from server.reft.layers import decoder_layers
from server.reft.positions import PositionSpec, interventions_per_layer, parse_positions

FORMAT_VERSION = 1
METADATA_KEY = "reft"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_HEADER_BYTES = 100_000_000
MAX_DIMENSION = 1 << 20  # hidden size, rank: far beyond any model, far inside what tensors can index
MAX_LAYER = 1 << 16
DEFAULT_MAX_ABS = 1e4
ORTHONORMAL_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}


class AdapterError(ValueError):
    """An adapter that cannot be served; `field` names what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class AdapterConfig:
    type: str
    rank: int
    hidden_size: int
    layers: tuple[int, ...]
    positions: str
    share_weights: bool = True
    activation: str = "linear"
    base_model: str = ""
    dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    base_model_fingerprint: str = ""  # server/adapters/fingerprint.py; "" = unverified
    provenance: dict = field(default_factory=dict, compare=False)  # how it was made: data, arguments, losses

    @property
    def position_spec(self) -> PositionSpec:
        return parse_positions(self.positions)

    @property
    def interventions_per_layer(self) -> int:
        return interventions_per_layer(self.share_weights)

    def to_json(self) -> str:
        # Empty additions stay out, so replicas older than them still read such adapters.
        fields = {k: v for k, v in asdict(self).items() if v or k not in _OMITTED_WHEN_EMPTY}
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, ignore_unknown: bool = False) -> AdapterConfig:
        return config_from_dict(parse_json_object(text, "metadata"), ignore_unknown)


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


_OMITTED_WHEN_EMPTY = ("base_model_fingerprint", "provenance")
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
    _check_config(config)
    return config


def _check_config(config: AdapterConfig) -> None:
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


def tensor_name(layer: int, index: int, param: str) -> str:
    return f"layers.{layer}.{index}.{param}"


@dataclass(frozen=True)
class ModelShape:
    """What an adapter is validated against: the served model's shape and the largest parameter
    magnitude the server accepts (the adapter_max_abs setting)."""

    num_layers: int
    hidden_size: int
    max_abs: float = DEFAULT_MAX_ABS

    @classmethod
    def of(cls, model, max_abs: float = DEFAULT_MAX_ABS) -> ModelShape:
        return cls(num_layers=len(decoder_layers(model)), hidden_size=model.config.hidden_size, max_abs=max_abs)


@dataclass
class AdapterFile:
    """An adapter as stored: its config and its tensors (on CPU, in the stored dtype)."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def intervention_params(self, layer: int, index: int) -> dict[str, torch.Tensor]:
        prefix = f"layers.{layer}.{index}."
        return {name[len(prefix) :]: t for name, t in self.tensors.items() if name.startswith(prefix)}

    def to_bytes(self) -> bytes:
        tensors = {name: t.contiguous() for name, t in self.tensors.items()}
        return save_safetensors(tensors, metadata={METADATA_KEY: self.config.to_json()})

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, ignore_unknown: bool = False) -> AdapterFile:
        """`ignore_unknown` for stored adapters, which newer code may have written (config_from_dict)."""
        metadata = _read_metadata(data)
        if METADATA_KEY not in metadata:
            raise AdapterError("metadata", f"the safetensors header has no {METADATA_KEY!r} metadata")
        config = AdapterConfig.from_json(metadata[METADATA_KEY], ignore_unknown)
        try:
            tensors = load_safetensors(data)
        except Exception as e:  # the library raises several types for malformed files
            raise AdapterError("file", f"not a valid safetensors file ({e})") from None
        return cls(config, tensors)

    @classmethod
    def load(cls, path: str | Path) -> AdapterFile:
        return cls.from_bytes(Path(path).read_bytes())


def read_config(path: str | Path) -> AdapterConfig:
    """The config of a stored adapter, from its header alone (no tensors read); fields this code
    does not know (written by a newer version) are ignored."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        data = prefix + f.read(min(header_len, MAX_HEADER_BYTES))
    return config_from_header(data)


def config_from_header(data: bytes) -> AdapterConfig:
    """The config in a safetensors header: its 8-byte length and the JSON after it (tensors may follow)."""
    metadata = _read_metadata(data)
    if METADATA_KEY not in metadata:
        raise AdapterError("metadata", f"the safetensors header has no {METADATA_KEY!r} metadata")
    return AdapterConfig.from_json(metadata[METADATA_KEY], ignore_unknown=True)


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise AdapterError("file", "too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or header_len > MAX_HEADER_BYTES:
        raise AdapterError("file", "not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError):  # malformed JSON or UTF-8, over-long integers, deep nesting
        raise AdapterError("file", "not a safetensors file (header is not JSON)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def validate(adapter: AdapterFile, model: ModelShape | None = None) -> None:
    """Raise AdapterError naming the first problem; None means the adapter can be served.
    Without a model, magnitudes are checked against the default bound."""
    config = adapter.config
    _check_config(config)
    if model is not None:
        if config.hidden_size != model.hidden_size:
            raise AdapterError(
                "hidden_size", f"adapter has hidden_size {config.hidden_size}, the model has {model.hidden_size}"
            )
        out_of_range = [layer for layer in config.layers if layer >= model.num_layers]
        if out_of_range:
            raise AdapterError(
                "layers",
                f"layer {out_of_range[0]} out of range: "
                f"the model has {model.num_layers} layers (0..{model.num_layers - 1})",
            )
    _check_tensors(adapter, model.max_abs if model is not None else DEFAULT_MAX_ABS)


def _check_tensors(adapter: AdapterFile, max_abs: float) -> None:
    config = adapter.config
    kind = INTERVENTION_TYPES[config.type]
    dims = {"d": config.hidden_size, "r": config.rank}
    expected = set()
    for layer in config.layers:
        for index in range(config.interventions_per_layer):
            for spec in kind.params:
                name = tensor_name(layer, index, spec.name)
                tensor = adapter.tensors.get(name)
                if tensor is None:
                    if spec.optional:
                        continue
                    raise AdapterError(f"tensors.{name}", "missing")
                expected.add(name)
                shape = spec.sizes(dims)
                if tuple(tensor.shape) != shape:
                    raise AdapterError(
                        f"tensors.{name}",
                        f"shape {list(tensor.shape)} does not match {list(shape)} ({'x'.join(spec.shape)})",
                    )
                if tensor.dtype not in DTYPES.values():
                    raise AdapterError(
                        f"tensors.{name}", f"must be a floating-point tensor of {', '.join(DTYPES)}; got {tensor.dtype}"
                    )
                if not torch.isfinite(tensor).all():
                    raise AdapterError(f"tensors.{name}", "contains NaN or infinite values")
                largest = tensor.abs().max().item() if tensor.numel() else 0.0
                if largest > max_abs:
                    raise AdapterError(
                        f"tensors.{name}",
                        f"holds a value of magnitude {largest:.3g}, beyond the limit of {max_abs:g} (adapter_max_abs)",
                    )
                if spec.orthonormal:
                    _check_orthonormal(name, tensor)
    unexpected = sorted(set(adapter.tensors) - expected)
    if unexpected:
        raise AdapterError(
            f"tensors.{unexpected[0]}",
            f"unexpected tensor for a {config.type} adapter with layers {list(config.layers)}",
        )


def _check_orthonormal(name: str, rotation: torch.Tensor) -> None:
    r = rotation.float()
    gram = r.T @ r
    error = (gram - torch.eye(gram.shape[0])).abs().max().item()
    tolerance = ORTHONORMAL_TOLERANCE.get(rotation.dtype, 1e-3)
    if not math.isfinite(error) or error > tolerance:
        raise AdapterError(
            f"tensors.{name}",
            f"columns are not orthonormal (max |R^T R - I| = {error:.3g}); "
            "a rotation trained with weight decay collapses",
        )
