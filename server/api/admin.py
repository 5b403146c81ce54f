"""The admin API under /v1/adapters: upload, import from pyreft or the Hub, list, show, roll back, delete.

Every route needs the admin bearer token. Uploads are validated against the served model before
anything is written (shapes, and the base-model fingerprint when the adapter records one); a
rejected upload leaves the store exactly as it was. Writes take If-Match / If-None-Match
(server/api/preconditions.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile
from safetensors.torch import load as load_safetensors

from server.adapters.archive import ArchiveError, unpack_checkpoint
from server.adapters.config_json import MAX_DIMENSION, config_from_dict, parse_json_object
from server.adapters.errors import AdapterError
from server.adapters.fingerprint import fingerprint_status
from server.adapters.format import AdapterFile
from server.adapters.hub import HubError, HubRef, pull
from server.adapters.model_shape import ModelShape
from server.adapters.options import AdapterOptions, parse_layers
from server.adapters.pyreft import import_pyreft
from server.adapters.registry import VersionFacts
from server.adapters.store import InvalidName, NameInfo, NotFound, Precondition, PreconditionFailed, check_name
from server.adapters.validation import validate
from server.api.deps import AppState, State
from server.api.errors import APIError
from server.api.preconditions import PRECONDITION_RESPONSES, etag, failed, precondition
from server.api.schemas import (
    MAX_NAME_CHARS,
    AdapterDetail,
    AdapterSummary,
    PublishResponse,
    ResidentAdapter,
    SetCurrentRequest,
    VersionSummary,
)

log = logging.getLogger(__name__)
ADMIN_PREFIX = "/v1/adapters"
# The admin token is checked by server/api/admin_gate.py before the body is read, for every route here.
router = APIRouter(prefix=ADMIN_PREFIX, tags=["adapters (admin)"])
MAX_FORM_CHARS = 64 * 1024  # the metadata form field (an adapter config is a few hundred bytes)
IfMatch = Annotated[
    str | None, Header(description='Change only if the current version is this ETag (e.g. "3"), or * if it exists')
]
IfNoneMatch = Annotated[str | None, Header(description="* = publish only if the name does not exist yet")]
# what a pyreft checkpoint does not record, as the two routes that import one take it
Activation = Annotated[str, Form(max_length=MAX_NAME_CHARS, description="Activation of the learned source")]
InterventionTypeField = Annotated[
    str | None, Form(max_length=MAX_NAME_CHARS, description="Needed only without config.json")
]
Layers = Annotated[
    str | None,
    Form(max_length=MAX_NAME_CHARS, description='Comma-separated or "all", needed only without config.json'),
]
Rank = Annotated[int | None, Form(ge=1, le=MAX_DIMENSION, description="Needed only without config.json")]


def _name(name: str) -> str:
    try:
        return check_name(name)
    except InvalidName as e:
        raise APIError(400, str(e), param="name") from None


def _rejected(error: AdapterError) -> APIError:
    return APIError(422, f"adapter rejected: {error}", param=error.field)


def _adapter_options(
    shape: ModelShape,
    positions: str | None,
    share_weights: bool,
    activation: str,
    intervention_type: str | None,
    layers: str | None,
    rank: int | None,
) -> AdapterOptions:
    """The form fields of a pyreft or Hub import; `layers` ("8,16", "8;16" or "all" of the served model)
    is given only for checkpoints without config.json."""
    try:
        layer_list = parse_layers(layers, shape.num_layers)
    except ValueError as e:
        raise APIError(400, str(e), param="layers") from None
    return AdapterOptions(positions, share_weights, activation, intervention_type, layer_list, rank)


def _model_shape(state: AppState) -> ModelShape:
    return state.registry.model


async def _read_upload(upload: UploadFile, limit: int, field: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"{field}: larger than the upload limit of {limit} bytes", param=field)
    if not data:
        raise APIError(400, f"{field}: the file is empty", param=field)
    return data


def _version_summary(state: AppState, name: str, info) -> VersionSummary:
    summary = VersionSummary(version=info.version, size=info.size, created=info.created)
    try:
        config = state.store.read_config(name, info.version)
    except (AdapterError, OSError, NotFound):  # NotFound: deleted since `info` was read
        return summary
    return summary.model_copy(
        update={
            "type": config.type,
            "layers": list(config.layers),
            "rank": config.rank,
            "positions": config.positions,
            "share_weights": config.share_weights,
            "loaded": state.registry.is_resident(name, info.version),
            "base_model": config.base_model,
            "base_model_fingerprint": config.base_model_fingerprint,
            "fingerprint_status": fingerprint_status(config.base_model_fingerprint, state.registry.fingerprint),
            "provenance": config.provenance,
        }
    )


def _detail(state: AppState, info: NameInfo) -> AdapterDetail:
    versions = [_version_summary(state, info.name, v) for v in info.versions]
    current = next((v for v in versions if v.version == info.current), None)
    return AdapterDetail(
        name=info.name,
        current_version=info.current,
        versions=[v.version for v in versions],
        size=current.size if current else 0,
        type=current.type if current else None,
        layers=current.layers if current else None,
        rank=current.rank if current else None,
        positions=current.positions if current else None,
        loaded=bool(current and current.loaded),
        fingerprint_status=current.fingerprint_status if current else None,
        details=versions,
    )


async def _info(state: AppState, name: str) -> NameInfo:
    try:
        return await asyncio.to_thread(state.store.info, name)
    except NotFound as e:
        raise APIError(404, str(e), param="name") from None


async def _publish(
    state: AppState, name: str, adapter: AdapterFile, response: Response, condition: Precondition | None
) -> PublishResponse:
    if not adapter.config.base_model:
        adapter.config = dataclasses.replace(adapter.config, base_model=state.model_name)
    payload = await asyncio.to_thread(adapter.to_bytes)

    def publish() -> tuple[int, float]:
        version = state.store.publish(name, payload, precondition=condition)
        try:
            return version, state.store.version_info(name, version).created
        except NotFound:  # another writer deleted the name at once: nothing to describe
            return version, time.time()

    async with state.registry.local_write(name):
        try:
            version, created = await asyncio.to_thread(publish)
        except PreconditionFailed as e:
            raise failed(e, condition) from None
        state.registry.published(name, version, VersionFacts(created, adapter.config.base_model_fingerprint))
    response.headers["ETag"] = etag(version)
    config = adapter.config
    return PublishResponse(
        name=name, version=version, size=len(payload), type=config.type, layers=list(config.layers), rank=config.rank
    )


def _check_base_model(state: AppState, adapter: AdapterFile, allow_foreign: bool) -> None:
    """A 422 naming both fingerprints for an adapter trained on another checkpoint, unless allowed."""
    foreign = None if allow_foreign else state.registry.foreign_error(adapter.config.base_model_fingerprint)
    if foreign:
        raise APIError(422, f"adapter rejected: {foreign}", param="base_model_fingerprint")


@router.get("", response_model=list[AdapterSummary] | list[ResidentAdapter])
async def list_adapters(
    state: State,
    resident: Annotated[
        bool, Query(description="List what this replica holds in memory: versions, bytes, loads, last use")
    ] = False,
):
    """Every adapter: versions, current version, size, type, layers, rank, loaded or not, fingerprint
    status. With `resident=true`, the adapter versions resident in this replica instead."""
    if resident:
        return [ResidentAdapter(**dataclasses.asdict(r)) for r in state.registry.resident_report()]
    names = await asyncio.to_thread(state.store.names)
    details = []
    for name in names:
        try:
            info = await asyncio.to_thread(state.store.info, name)
        except NotFound:
            continue  # deleted meanwhile
        except (ValueError, OSError) as e:  # a pointer written by hand, a flaky volume: not every name's listing
            log.warning("adapter %r left out of the listing: its pointer is unreadable (%s)", name, e)
            continue
        details.append(AdapterSummary(**_detail(state, info).model_dump(exclude={"details"})))
    return details


@router.get("/{name}", response_model=AdapterDetail)
async def show_adapter(name: str, state: State, response: Response):
    """One adapter with every version's details; the ETag header is the current version."""
    info = await _info(state, _name(name))
    response.headers["ETag"] = etag(info.current)
    return _detail(state, info)


@router.post("/{name}", response_model=PublishResponse, status_code=201, responses=PRECONDITION_RESPONSES)
async def upload_adapter(
    name: str,
    file: Annotated[UploadFile, File(description="The adapter .safetensors file")],
    state: State,
    response: Response,
    metadata: Annotated[
        str | None,
        Form(max_length=MAX_FORM_CHARS, description="Adapter config as JSON, when the file's header has none"),
    ] = None,
    allow_foreign: Annotated[
        bool, Form(description="Accept an adapter trained on another base model (fingerprint differs)")
    ] = False,
    if_match: IfMatch = None,
    if_none_match: IfNoneMatch = None,
):
    """Publish a new version of `name` (created if new) and make it current: hot swap.
    With If-Match / If-None-Match, only if the current version is still the one the client read."""
    name = _name(name)
    condition = precondition(if_match, if_none_match)
    data = await _read_upload(file, state.settings.max_upload_size, "file")
    config = None
    if metadata is not None:
        try:
            config = config_from_dict(parse_json_object(metadata, "metadata"))
        except AdapterError as e:
            raise APIError(400, str(e), param="metadata") from None
    shape = _model_shape(state)
    try:  # parsing and validating a 200 MB upload takes a while: off the event loop
        adapter = await asyncio.to_thread(_parse_and_validate, data, config, shape)
    except AdapterError as e:
        raise _rejected(e) from None
    _check_base_model(state, adapter, allow_foreign)
    return await _publish(state, name, adapter, response, condition)


def _parse_and_validate(data: bytes, config, shape: ModelShape) -> AdapterFile:
    """The upload as an AdapterFile; `config` replaces the header's when given as a form field."""
    if config is None:
        adapter = AdapterFile.from_bytes(data)
    else:
        try:
            tensors = load_safetensors(data)
        except Exception as e:  # malformed safetensors raise several types
            raise AdapterError("file", f"not a valid safetensors file ({e})") from None
        adapter = AdapterFile(config, tensors)
    validate(adapter, shape)
    return adapter


@router.post("/{name}/pyreft", response_model=PublishResponse, status_code=201, responses=PRECONDITION_RESPONSES)
async def import_pyreft_adapter(
    name: str,
    archive: Annotated[UploadFile, File(description="A .tar(.gz) or .zip of the pyreft checkpoint directory")],
    positions: Annotated[str, Form(max_length=MAX_NAME_CHARS, description="Positions it was trained with, e.g. f7+l7")],
    share_weights: Annotated[bool, Form(description="Whether prefix and suffix shared one intervention")],
    state: State,
    response: Response,
    activation: Activation = "linear",
    intervention_type: InterventionTypeField = None,
    layers: Layers = None,
    rank: Rank = None,
    if_match: IfMatch = None,
    if_none_match: IfNoneMatch = None,
):
    """Import a pyreft/pyvene checkpoint (weights_only loading) as a new version of `name`."""
    name = _name(name)
    condition = precondition(if_match, if_none_match)
    data = await _read_upload(archive, state.settings.max_upload_size, "archive")
    shape = _model_shape(state)
    options = _adapter_options(shape, positions, share_weights, activation, intervention_type, layers, rank)

    def unpack_and_import() -> AdapterFile:
        with tempfile.TemporaryDirectory(prefix="reft-import-") as tmp:
            directory = unpack_checkpoint(data, Path(tmp) / "checkpoint", max_bytes=state.settings.max_upload_size)
            return import_pyreft(directory, **options.fields(), base_model=state.model_name, model=shape)

    try:
        adapter = await asyncio.to_thread(unpack_and_import)
    except ArchiveError as e:
        raise APIError(422, f"archive rejected: {e}", param="archive") from None
    except AdapterError as e:
        raise _rejected(e) from None
    return await _publish(state, name, adapter, response, condition)


HUB_RESPONSES = {
    403: {"description": "The repo is gated or private to the server's HF_TOKEN"},
    404: {"description": "The repo, revision or adapter files are missing (offline: not in the local cache)"},
    413: {"description": "The repo's adapter files come to more than the upload limit (nothing is downloaded)"},
    502: {"description": "The Hugging Face Hub could not be reached, or failed"},
}


@router.post(
    "/{name}/hub",
    response_model=PublishResponse,
    status_code=201,
    responses={**PRECONDITION_RESPONSES, **HUB_RESPONSES},
)
async def pull_from_hub(
    name: str,
    repo: Annotated[
        str,
        Form(max_length=MAX_NAME_CHARS, description="Hub repo id, optionally @revision (a branch, tag or commit)"),
    ],
    state: State,
    response: Response,
    positions: Annotated[
        str | None, Form(max_length=MAX_NAME_CHARS, description="Positions it was trained with (pyreft checkpoints)")
    ] = None,
    share_weights: Annotated[bool, Form(description="Prefix and suffix share one intervention (pyreft)")] = False,
    activation: Activation = "linear",
    intervention_type: InterventionTypeField = None,
    layers: Layers = None,
    rank: Rank = None,
    allow_foreign: Annotated[
        bool, Form(description="Accept an adapter trained on another base model (fingerprint differs)")
    ] = False,
    if_match: IfMatch = None,
    if_none_match: IfNoneMatch = None,
):
    """Import a pyreft checkpoint or a .safetensors adapter from the Hub (the server's HF_TOKEN) as a
    new version of `name`; the repo and its resolved commit are recorded in the provenance."""
    name = _name(name)
    condition = precondition(if_match, if_none_match)
    shape = _model_shape(state)
    options = _adapter_options(shape, positions, share_weights, activation, intervention_type, layers, rank)
    try:
        ref, max_bytes = HubRef.parse(repo), int(state.settings.max_upload_size)
        adapter = await asyncio.to_thread(pull, ref, options, max_bytes, state.model_name, shape)
    except HubError as e:  # an invalid reference is one too (400)
        raise APIError(e.status, str(e), param="repo") from None
    except AdapterError as e:
        raise _rejected(e) from None
    _check_base_model(state, adapter, allow_foreign)
    return await _publish(state, name, adapter, response, condition)


@router.put("/{name}/current", response_model=AdapterDetail, responses=PRECONDITION_RESPONSES)
async def set_current_version(
    name: str,
    body: SetCurrentRequest,
    state: State,
    response: Response,
    if_match: IfMatch = None,
    if_none_match: IfNoneMatch = None,
):
    """Serve another existing version (roll back or forward); running requests keep theirs."""
    name = _name(name)
    condition = precondition(if_match, if_none_match)  # an ignored If-None-Match would write unconditionally
    async with state.registry.local_write(name):
        try:
            await asyncio.to_thread(state.store.set_current, name, body.version, condition)
        except NotFound as e:
            raise APIError(404, str(e), param="version") from None
        except PreconditionFailed as e:
            raise failed(e, condition) from None
        state.registry.published(name, body.version)
    response.headers["ETag"] = etag(body.version)
    return _detail(state, await _info(state, name))


@router.delete("/{name}", responses=PRECONDITION_RESPONSES)
async def delete_adapter(name: str, state: State, if_match: IfMatch = None, if_none_match: IfNoneMatch = None):
    """Take `name` out of service and delete its files; running requests finish unharmed."""
    name = _name(name)
    condition = precondition(if_match, if_none_match)
    async with state.registry.local_write(name):
        try:
            await asyncio.to_thread(state.store.delete, name, condition)
        except NotFound as e:
            raise APIError(404, str(e), param="name") from None
        except PreconditionFailed as e:
            raise failed(e, condition) from None
        state.registry.deleted(name)
    return {"name": name, "deleted": True}
