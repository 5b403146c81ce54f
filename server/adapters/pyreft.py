"""Import pyreft / pyvene checkpoints into the server's adapter format.

A checkpoint directory holds `intkey_<key>.bin` files, one torch pickle per intervention, and (when
written by `ReftModel.save`) a pyvene `config.json`. Keys look like
`layer_15_comp_block_output_unit_pos_nunit_1#0` (pyvene >= 0.1.7) or
`layer.15.comp.block_output.unit.pos.nunit.1#0` (older); `#i` numbers repeated (layer, component)
pairs: without shared weights #0 is the first-positions and #1 the last-positions intervention.

pyreft does not record positions, weight sharing or the activation: the caller supplies them.
Pickles are only ever read with `torch.load(weights_only=True)`, which refuses code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from server.adapters.format import DTYPES, AdapterConfig, AdapterError, AdapterFile, ModelShape, tensor_name, validate
from server.reft.interventions import INTERVENTION_TYPES

_KEY = re.compile(r"^layer[._](\d+)[._]comp[._](.+?)[._]unit[._](.+?)[._]nunit[._](\d+)#(\d+)$")
_PYREFT_CLASS = re.compile(r"(\w+)'?>?$")
SUPPORTED_COMPONENT = "block_output"


@dataclass(frozen=True)
class _Key:
    layer: int
    component: str
    index: int


def _parse_key(key: str) -> _Key:
    match = _KEY.match(key)
    if not match:
        raise AdapterError("checkpoint", f"unrecognized intervention key {key!r}")
    return _Key(layer=int(match.group(1)), component=match.group(2), index=int(match.group(5)))


def _type_from_pyreft_class(text: str) -> str:
    """ "<class 'pyreft.interventions.LoreftIntervention'>" -> "loreft"."""
    match = _PYREFT_CLASS.search(text.strip())
    class_name = match.group(1) if match else text
    for name, kind in INTERVENTION_TYPES.items():
        if kind.pyreft_class == class_name or name == class_name.lower():
            return name
    raise AdapterError("type", f"unsupported pyreft intervention class {text!r}")


def orthogonal_from_householder(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """R' of `torch.nn.utils.parametrizations.orthogonal` (Householder map with a base) from its state.

    R' = base @ (householder_product(A, tau) * sign), A = original's strict lower triangle and sign
    the integer part of original's diagonal, as torch does; NOT `original` itself. `original` is
    [n, k] or [k, n] with n >= k and `base` is [n, n]; anything else is an AdapterError.
    """
    if original.dim() != 2 or base.dim() != 2 or not original.is_floating_point() or not base.is_floating_point():
        raise AdapterError("rotation", "the orthogonal parametrization's state must be 2-D floating-point tensors")
    n = max(original.shape)
    if min(original.shape) < 1 or tuple(base.shape) != (n, n):
        raise AdapterError(
            "rotation",
            f"parametrization shapes do not fit: original {list(original.shape)}, base {list(base.shape)} "
            f"(expected [{n}, {n}])",
        )
    x = original.double()
    transposed = x.shape[0] < x.shape[1]
    if transposed:
        x = x.T
    reflectors = x.tril(diagonal=-1)
    tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=-2))
    q = torch.linalg.householder_product(reflectors, tau)
    q = q * x.diagonal().int().unsqueeze(-2)
    q = base.double() @ q
    return (q.T if transposed else q).to(original.dtype)


def _convert_state(state: dict[str, torch.Tensor], kind: str, where: str) -> dict[str, torch.Tensor]:
    """Map one pyreft intervention state dict to the server's parameter names."""
    params: dict[str, torch.Tensor] = {}
    if "rotate_layer" in state:
        params["rotation"] = state["rotate_layer"]
    elif "rotate_layer.parametrizations.weight.original" in state:
        original = state["rotate_layer.parametrizations.weight.original"]
        base = state.get("rotate_layer.parametrizations.weight.0.base")
        if base is None:
            raise AdapterError(where, "has the orthogonal parametrization's 'original' but not its 'base'")
        params["rotation"] = orthogonal_from_householder(original, base)
    renames = {
        "weight": "weight",
        "bias": "bias",
        "learned_source.weight": "weight",
        "learned_source.bias": "bias",
        "learned_source": "bias",  # ConsReFT / LobiReFT: a learned vector
        "proj_layer.weight": "proj_weight",
        "proj_layer.bias": "proj_bias",
    }
    for old, new in renames.items():
        if old in state:
            params[new] = state[old]
    kind_params = {spec.name for spec in INTERVENTION_TYPES[kind].params}
    if "proj_bias" in params and kind == "nodireft":
        del params["proj_bias"]  # NoDiReFT stores a projection bias it never uses
    missing = [spec.name for spec in INTERVENTION_TYPES[kind].params if not spec.optional and spec.name not in params]
    if missing:
        raise AdapterError(where, f"missing {', '.join(missing)} for a {kind} intervention (keys: {sorted(state)})")
    return {name: t for name, t in params.items() if name in kind_params}


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code, RuntimeError/EOFError for corrupt files
        raise AdapterError(
            path.name, f"cannot be read safely as a tensor state dict ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(path.name, "is not a state dict of tensors")
    return state


def _read_config(directory: Path) -> tuple[list[str], list[str], list[int]] | None:
    """(sorted keys, types, ranks) from pyvene's config.json, or None for a trainer checkpoint."""
    path = directory / "config.json"
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        keys = list(raw["sorted_keys"])
        types = [_type_from_pyreft_class(t) for t in raw["intervention_types"]]
        ranks = [int(rep[4]) for rep in raw["representations"]]
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError("config.json", f"not a pyvene IntervenableConfig ({type(e).__name__}: {e})") from None
    if len(types) == 1 and len(keys) > 1:
        types = types * len(keys)
    if not (len(keys) == len(types) == len(ranks)):
        raise AdapterError("config.json", "sorted_keys, intervention_types and representations differ in length")
    return keys, types, ranks


def import_pyreft(
    directory: str | Path,
    *,
    positions: str,
    share_weights: bool,
    activation: str = "linear",
    intervention_type: str | None = None,
    layers: list[int] | None = None,
    rank: int | None = None,
    base_model: str = "",
    model: ModelShape | None = None,
) -> AdapterFile:
    """Read a pyreft checkpoint directory into a validated AdapterFile.

    `intervention_type`, `layers` and `rank` are needed only for trainer checkpoints without
    config.json (and, when given, must agree with one that has it).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError("checkpoint", f"{directory} is not a directory")
    files = {p.name[len("intkey_") : -len(".bin")]: p for p in directory.glob("intkey_*.bin")}
    if not files:
        raise AdapterError("checkpoint", f"no intkey_*.bin files in {directory}")
    recorded = _read_config(directory)
    if recorded is not None:
        keys, types, ranks = recorded
        missing = [k for k in keys if k not in files]
        if missing:
            raise AdapterError("checkpoint", f"config.json names intkey_{missing[0]}.bin, which is missing")
        if len(set(types)) != 1:
            raise AdapterError(
                "type", f"mixed intervention types {sorted(set(types))} in one adapter are not supported"
            )
        if intervention_type is not None and intervention_type != types[0]:
            raise AdapterError("type", f"checkpoint holds {types[0]} interventions, not {intervention_type}")
        kind = types[0]
    else:
        if intervention_type is None:
            raise AdapterError("type", "a checkpoint without config.json needs the intervention type")
        if intervention_type not in INTERVENTION_TYPES:
            raise AdapterError("type", f"unknown intervention type {intervention_type!r}")
        keys, kind = sorted(files), intervention_type

    parsed = {key: _parse_key(key) for key in keys}
    for key, info in parsed.items():
        if info.component != SUPPORTED_COMPONENT:
            raise AdapterError("checkpoint", f"{key}: only {SUPPORTED_COMPONENT!r} interventions are supported")
    found_layers = sorted({info.layer for info in parsed.values()})
    if layers is not None and sorted(layers) != found_layers:
        raise AdapterError("layers", f"checkpoint has layers {found_layers}, not {sorted(layers)}")
    per_layer = 1 if share_weights else 2
    for layer in found_layers:
        indices = sorted(info.index for info in parsed.values() if info.layer == layer)
        if indices != list(range(per_layer)):
            raise AdapterError(
                "share_weights",
                f"layer {layer} has {len(indices)} intervention(s) but share_weights={share_weights} needs {per_layer}",
            )

    tensors: dict[str, torch.Tensor] = {}
    dtypes = set()
    for key, info in parsed.items():
        params = _convert_state(_load_state(files[key]), kind, f"intkey_{key}.bin")
        for name, t in params.items():
            tensors[tensor_name(info.layer, info.index, name)] = t.contiguous()
            dtypes.add(t.dtype)
    first_rotation_or_weight = next(t for name, t in tensors.items() if name.endswith(("rotation", "proj_weight")))
    if first_rotation_or_weight.dim() != 2 or min(first_rotation_or_weight.shape) < 1:
        raise AdapterError("rotation", f"must be a 2-D matrix, got shape {list(first_rotation_or_weight.shape)}")
    hidden_size = max(first_rotation_or_weight.shape)
    found_rank = min(first_rotation_or_weight.shape)
    if rank is not None and rank != found_rank:
        raise AdapterError("rank", f"checkpoint has rank {found_rank}, not {rank}")
    if recorded is not None and set(recorded[2]) != {found_rank}:
        raise AdapterError("rank", f"config.json records ranks {sorted(set(recorded[2]))}, tensors have {found_rank}")
    dtype = next((name for name, d in DTYPES.items() if d in dtypes and d != torch.float32), "float32")
    config = AdapterConfig(
        type=kind,
        rank=found_rank,
        hidden_size=hidden_size,
        layers=tuple(found_layers),
        positions=positions,
        share_weights=share_weights,
        activation=activation,
        base_model=base_model,
        dtype=dtype,
    )
    adapter = AdapterFile(config, tensors)
    validate(adapter, model)
    return adapter
