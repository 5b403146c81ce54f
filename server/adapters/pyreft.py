"""Import pyreft / pyvene checkpoints into the server's adapter format.

A checkpoint directory holds `intkey_<key>.bin` files, one torch pickle per intervention, and (when
written by `ReftModel.save`) a pyvene `config.json`. Keys look like
`layer_15_comp_block_output_unit_pos_nunit_1#0` (pyvene >= 0.1.7) or
`layer.15.comp.block_output.unit.pos.nunit.1#0` (older); `#i` numbers repeated (layer, component)
pairs: without shared weights #0 is the first-positions and #1 the last-positions intervention.

pyreft does not record positions, weight sharing or the activation: the caller supplies them. Which
state-dict key holds which parameter, and the hidden size and rank read off their shapes, come from
the type table (`ParamSpec.pyreft_names`, `ParamSpec.shape`), so a plugin type imports as a built-in.
Pickles are only ever read with `torch.load(weights_only=True)`, which refuses code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from server.adapters.dtypes import DTYPES
from server.adapters.errors import AdapterError
from server.adapters.format import AdapterFile, tensor_name
from server.adapters.model_shape import ModelShape
from server.adapters.validation import validate
from server.reft.config import AdapterConfig
from server.reft.interventions import INTERVENTION_TYPES, InterventionType, ParamSpec
from server.reft.positions import interventions_per_layer

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


def orthogonal_from_parametrization(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """R' of `torch.nn.utils.parametrizations.orthogonal` (default map, with a base) from its state.

    R' = base @ Q, NOT `original` itself. A square matrix maps by matrix_exp: Q = exp(X - X^T), X the
    lower triangle of original. Any other by Householder: Q = householder_product(A, tau) * sign, A
    original's strict lower triangle and sign the integer part of its diagonal, as torch does.
    `original` is [n, k] or [k, n] with n >= k and `base` is [n, n]; anything else is an AdapterError.
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
    q = _matrix_exp_map(x) if x.shape[0] == x.shape[1] else _householder_map(x)
    q = base.double() @ q
    return (q.T if transposed else q).to(original.dtype)


def _matrix_exp_map(x: torch.Tensor) -> torch.Tensor:
    lower = x.tril()
    return torch.linalg.matrix_exp(lower - lower.T)


def _householder_map(x: torch.Tensor) -> torch.Tensor:
    reflectors = x.tril(diagonal=-1)
    tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=-2))
    return torch.linalg.householder_product(reflectors, tau) * x.diagonal().int().unsqueeze(-2)


def _convert_state(state: dict[str, torch.Tensor], kind: InterventionType, where: str) -> dict[str, torch.Tensor]:
    """One pyreft intervention state dict under the server's parameter names, as the type table maps them;
    keys the type does not declare (NoDiReFT's unused projection bias, pyvene's sizes) are left out."""
    params = {}
    for spec in kind.params:
        tensor = _pyreft_param(state, spec, where)
        if tensor is not None:
            params[spec.name] = tensor
    missing = [spec.name for spec in kind.params if not spec.optional and spec.name not in params]
    if missing:
        raise AdapterError(
            where, f"missing {', '.join(missing)} for a {kind.name} intervention (keys: {sorted(state)})"
        )
    return params


def _pyreft_param(state: dict[str, torch.Tensor], spec: ParamSpec, where: str) -> torch.Tensor | None:
    for key in spec.pyreft_names:
        if key in state:
            return state[key]
        original = state.get(f"{key}.parametrizations.weight.original")
        if spec.orthonormal and original is not None:
            base = state.get(f"{key}.parametrizations.weight.0.base")
            if base is None:
                raise AdapterError(where, "has the orthogonal parametrization's 'original' but not its 'base'")
            return orthogonal_from_parametrization(original, base)
    return None


def _dims(kind: InterventionType, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Hidden size and rank read off the parameters' shapes as the type table names their axes."""
    dims: dict[str, int] = {}
    for spec in kind.params:
        tensor = tensors.get(spec.name)
        if tensor is None:
            continue
        if tensor.dim() != len(spec.shape):
            raise AdapterError(
                spec.name, f"must be a {len(spec.shape)}-D tensor ({'x'.join(spec.shape)}), got {list(tensor.shape)}"
            )
        for axis, size in zip(spec.shape, tensor.shape, strict=True):
            dims.setdefault(axis, size)
    if set(dims) != {"d", "r"}:
        raise AdapterError("type", f"the {kind.name} parameters do not show both the hidden size and the rank")
    return dims


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code, RuntimeError/EOFError for corrupt files
        raise AdapterError(
            path.name, f"cannot be read safely as a tensor state dict ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(path.name, "is not a state dict of tensors")
    for key, tensor in state.items():  # a stride-0 view of a few stored bytes would unpack to gigabytes
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise AdapterError(path.name, f"{key}: a view of more elements than the file stores")
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
        type_name = types[0]
    else:
        if intervention_type is None:
            raise AdapterError("type", "a checkpoint without config.json needs the intervention type")
        if intervention_type not in INTERVENTION_TYPES:
            raise AdapterError("type", f"unknown intervention type {intervention_type!r}")
        keys, type_name = sorted(files), intervention_type

    parsed = {key: _parse_key(key) for key in keys}
    for key, info in parsed.items():
        if info.component != SUPPORTED_COMPONENT:
            raise AdapterError("checkpoint", f"{key}: only {SUPPORTED_COMPONENT!r} interventions are supported")
    found_layers = sorted({info.layer for info in parsed.values()})
    if layers is not None and sorted(layers) != found_layers:
        raise AdapterError("layers", f"checkpoint has layers {found_layers}, not {sorted(layers)}")
    per_layer = interventions_per_layer(share_weights)
    for layer in found_layers:
        indices = sorted(info.index for info in parsed.values() if info.layer == layer)
        if indices != list(range(per_layer)):
            raise AdapterError(
                "share_weights",
                f"layer {layer} has {len(indices)} intervention(s) but share_weights={share_weights} needs {per_layer}",
            )

    kind = INTERVENTION_TYPES[type_name]
    if not kind.importable_from_pyreft:
        raise AdapterError("type", f"the {type_name} type does not say where pyreft keeps its parameters")
    tensors: dict[str, torch.Tensor] = {}
    dtypes = set()
    dims: dict[str, int] = {}
    for key, info in parsed.items():
        params = _convert_state(_load_state(files[key]), kind, f"intkey_{key}.bin")
        dims = dims or _dims(kind, params)
        for name, t in params.items():
            tensors[tensor_name(info.layer, info.index, name)] = t.contiguous()
            dtypes.add(t.dtype)
    found_rank = dims["r"]
    if rank is not None and rank != found_rank:
        raise AdapterError("rank", f"checkpoint has rank {found_rank}, not {rank}")
    if recorded is not None and set(recorded[2]) != {found_rank}:
        raise AdapterError("rank", f"config.json records ranks {sorted(set(recorded[2]))}, tensors have {found_rank}")
    dtype = next((name for name, d in DTYPES.items() if d in dtypes and d != torch.float32), "float32")
    config = AdapterConfig(
        type=type_name,
        rank=found_rank,
        hidden_size=dims["d"],
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
