"""The on-disk adapter format: one `.safetensors` file, metadata in its header.

Tensors are named `layers.<layer>.<index>.<param>`: `<index>` numbers the interventions of one layer
(0 only with shared weights; 0 = first positions and 1 = last positions without), `<param>` is a
parameter name of the intervention type (see server/reft/interventions.py). The safetensors header's
`__metadata__` holds one key, "reft", whose value is the JSON of `AdapterConfig` (server/reft/config.py),
checked on the way in by server/adapters/config_json.py. Whether the tensors fit the config and the
model is server/adapters/validation.py's business.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server.adapters.config_json import config_from_json
from server.adapters.errors import AdapterError
from server.reft.config import AdapterConfig

METADATA_KEY = "reft"
MAX_HEADER_BYTES = 100_000_000


def tensor_name(layer: int, index: int, param: str) -> str:
    return f"layers.{layer}.{index}.{param}"


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
        config = config_from_json(metadata[METADATA_KEY], ignore_unknown)
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
    return config_from_json(metadata[METADATA_KEY], ignore_unknown=True)


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
