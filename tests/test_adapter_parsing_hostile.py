"""Hostile adapter input: whatever the bytes, the safetensors header, the config or the archive,
parsing ends in the documented error (AdapterError, ArchiveError) or a valid result, never anything
else; and the specific inputs that used to crash or cost gigabytes."""

import gzip
import io
import json
import struct
import tarfile
import time
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.adapters.archive import MAX_MEMBERS, ArchiveError, unpack_checkpoint
from server.adapters.config_json import config_from_dict
from server.adapters.errors import AdapterError
from server.adapters.format import AdapterFile
from server.adapters.model_shape import ModelShape
from server.adapters.pyreft import import_pyreft, orthogonal_from_parametrization
from server.adapters.random_adapters import random_adapter_file
from server.adapters.validation import validate
from tests.conftest import FIXTURE

MODEL = ModelShape(num_layers=4, hidden_size=16)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
CONFIG_KEYS = ["type", "rank", "hidden_size", "layers", "positions", "share_weights", "activation", "dtype"]


def safetensors_bytes(header, payload: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    encoded = text.encode()
    return struct.pack("<Q", len(encoded)) + encoded + payload


def valid_config(**changes) -> dict:
    return {"type": "loreft", "rank": 2, "hidden_size": 16, "layers": [1], "positions": "f1+l1", **changes}


# -- properties ---------------------------------------------------------------------------------------
@PROPERTY
@given(data=st.binary(max_size=300))
def test_any_bytes_parse_or_give_an_adapter_error(data):
    try:
        AdapterFile.from_bytes(data)
    except AdapterError:
        pass


@PROPERTY
@given(metadata=JSON_VALUES, extra=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3))
def test_any_header_parses_or_gives_an_adapter_error(metadata, extra):
    reft = metadata if isinstance(metadata, str) else json.dumps(metadata)
    for header in ({"__metadata__": {"reft": reft}, **extra}, {"__metadata__": {"reft": metadata}}):
        try:
            validate(AdapterFile.from_bytes(safetensors_bytes(header)), MODEL)
        except AdapterError:
            pass


@PROPERTY
@given(raw=st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8), JSON_VALUES, max_size=8))
def test_any_config_dict_builds_or_gives_an_adapter_error(raw):
    try:
        config_from_dict({**valid_config(), **raw})
    except AdapterError:
        pass


MEMBER = st.tuples(
    st.sampled_from(["config.json", "intkey_a.bin", "x/intkey_b.bin", "../evil.bin", "/abs.bin", "a" * 300])
    | st.text(min_size=1, max_size=40),
    st.binary(max_size=64),
    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE]),
)


def tar_of(members, compress: bool) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w", format=tarfile.PAX_FORMAT) as archive:
        for name, content, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(content) if kind == tarfile.REGTYPE else 0
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            archive.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def zip_of(members) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content, _ in members:
            if name.split("\x00")[0]:  # zipfile cuts a name at NUL and cannot write an empty one
                archive.writestr(name, content)
    return buffer.getvalue()


@PROPERTY
@given(
    members=st.lists(MEMBER, max_size=5, unique_by=lambda member: member[0]),
    kind=st.sampled_from(["tar", "tgz", "zip"]),
    cut=st.integers(0, 4096),
    flip=st.integers(0, 4096),
)
def test_any_archive_unpacks_or_gives_an_archive_error(tmp_path, members, kind, cut, flip):
    data = {
        "tar": lambda: tar_of(members, False),
        "tgz": lambda: tar_of(members, True),
        "zip": lambda: zip_of(members),
    }[kind]()
    corrupted = bytearray(data[: max(cut, 1)] if cut < len(data) // 2 else data)  # truncated, or whole...
    if corrupted and flip % 3 == 0:
        corrupted[flip % len(corrupted)] ^= 0xFF  # ...and sometimes a flipped byte
    for attempt, payload in enumerate((data, bytes(corrupted))):
        try:
            unpack_checkpoint(payload, tmp_path / f"out-{attempt}-{time.monotonic_ns()}", max_bytes=1 << 20)
        except ArchiveError:
            pass


# -- the safetensors header and the config ------------------------------------------------------------
@pytest.mark.parametrize(
    "reft",
    [
        "[" * 100_000 + "]" * 100_000,  # nested deeper than the JSON parser recurses
        json.dumps(valid_config(rank=0)).replace('"rank": 0', '"rank": ' + "9" * 5000),  # past Python's digit limit
        {"type": "loreft"},  # an object where the format has a JSON string
        42,
        None,
    ],
    ids=["deep-nesting", "5000-digits", "object", "number", "null"],
)
def test_hostile_reft_metadata_is_an_adapter_error(reft):
    with pytest.raises(AdapterError) as info:
        AdapterFile.from_bytes(safetensors_bytes({"__metadata__": {"reft": reft}}))
    assert info.value.field == "metadata"


def test_hostile_header_json_is_an_adapter_error():
    for header in ("[" * 100_000, '{"a": ' + "9" * 5000 + "}"):
        with pytest.raises(AdapterError, match="not a safetensors file"):
            AdapterFile.from_bytes(safetensors_bytes(header))


@pytest.mark.parametrize("field, value", [("rank", 10**30), ("hidden_size", 10**30), ("layers", [10**30])])
def test_config_sizes_are_bounded(field, value):
    with pytest.raises(AdapterError) as info:
        config_from_dict(valid_config(**{field: value}))
    assert info.value.field == field


# -- tensors ------------------------------------------------------------------------------------------
def small_adapter(**overrides) -> AdapterFile:
    return random_adapter_file("loreft", (1,), 2, "f1+l1", MODEL.hidden_size, **overrides)


def test_float8_tensors_are_refused():
    adapter = small_adapter()
    adapter.tensors["layers.1.0.weight"] = adapter.tensors["layers.1.0.weight"].to(torch.float8_e4m3fn)
    with pytest.raises(AdapterError, match="floating-point tensor of float32"):
        validate(adapter, MODEL)


def test_finite_but_huge_parameters_are_refused_by_a_configurable_bound():
    adapter = small_adapter()
    adapter.tensors["layers.1.0.weight"] = torch.full((2, MODEL.hidden_size), 3e38)
    with pytest.raises(AdapterError, match="adapter_max_abs") as info:
        validate(adapter, MODEL)
    assert info.value.field == "tensors.layers.1.0.weight"
    adapter.tensors["layers.1.0.weight"] = torch.full((2, MODEL.hidden_size), 50.0)
    validate(adapter, MODEL)  # within the default bound of 1e4
    with pytest.raises(AdapterError, match="limit of 10"):
        validate(adapter, ModelShape(MODEL.num_layers, MODEL.hidden_size, max_abs=10.0))


# -- pyreft state -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "original, base",
    [
        (torch.zeros(24, 4, 2), torch.eye(24)),  # wrong rank
        (torch.zeros(24, 4), torch.eye(23)),  # base does not fit
        (torch.zeros(24, 4), torch.zeros(24)),
        (torch.zeros(24, 0), torch.eye(24)),  # empty
        (torch.tensor(1.0), torch.eye(24)),  # 0-d
        (torch.zeros(24, 4, dtype=torch.int64), torch.eye(24)),
    ],
    ids=["3-d", "base-shape", "base-1-d", "empty", "0-d", "integer"],
)
def test_householder_state_of_the_wrong_shape_is_an_adapter_error(original, base):
    with pytest.raises(AdapterError, match="rotation"):
        orthogonal_from_parametrization(original, base)


@pytest.mark.parametrize("rotation", [torch.tensor(1.0), torch.ones(192)], ids=["0-d", "1-d"])
def test_pyreft_rotation_that_is_not_a_matrix_is_an_adapter_error(tmp_path, rotation):
    key = "layer_2_comp_block_output_unit_pos_nunit_1#0"
    state = {"rotate_layer": rotation, "weight": torch.zeros(4, 192), "bias": torch.zeros(4)}
    torch.save(state, tmp_path / f"intkey_{key}.bin")
    with pytest.raises(AdapterError):
        import_pyreft(tmp_path, positions="f1", share_weights=True, intervention_type="loreft")


# -- archives -----------------------------------------------------------------------------------------
def checkpoint_tar(compression: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as archive:
        archive.add(FIXTURE / "adapters" / "lo_l14_f3l3_unshared", arcname="checkpoint")
    return buffer.getvalue()


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_a_real_checkpoint_unpacks_from_any_tar(tmp_path, compression):
    """An uncompressed tar of a torch .bin holds a zip record: the tar must still be read as a tar."""
    directory = unpack_checkpoint(checkpoint_tar(compression), tmp_path / "out", max_bytes=1 << 20)
    imported = import_pyreft(directory, positions="f3+l3", share_weights=False)
    expected = import_pyreft(FIXTURE / "adapters" / "lo_l14_f3l3_unshared", positions="f3+l3", share_weights=False)
    assert imported.tensors.keys() == expected.tensors.keys()


def test_a_gzip_bomb_is_cut_off_early_without_holding_it(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("checkpoint/intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin")
        info.size = 64 * 2**20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = gzip.compress(buffer.getvalue())
    assert len(bomb) < 2**20
    started = time.perf_counter()
    with pytest.raises(ArchiveError, match="(exceed|more than) [0-9]+ bytes"):
        unpack_checkpoint(bomb, tmp_path / "out", max_bytes=2**20)
    assert time.perf_counter() - started < 2.0
    assert sum(p.stat().st_size for p in (tmp_path / "out").iterdir()) <= 2**20


def test_skipped_members_count_towards_the_stream_bound(tmp_path):
    bomb = gzip.compress(tar_of([("filler.dat", bytes(8 * 2**20), tarfile.REGTYPE)], False), compresslevel=1)
    with pytest.raises(ArchiveError, match="unpacks to more than"):
        unpack_checkpoint(bomb, tmp_path / "out", max_bytes=2**20)


def test_member_count_is_checked_while_iterating(tmp_path):
    many = tar_of([(f"f{i}", b"", tarfile.REGTYPE) for i in range(MAX_MEMBERS + 1)], True)
    with pytest.raises(ArchiveError, match=f"more than {MAX_MEMBERS} entries"):
        unpack_checkpoint(many, tmp_path / "out", max_bytes=8 * 2**20)
    many_zip = zip_of([(f"f{i}", b"", None) for i in range(MAX_MEMBERS + 1)])
    with pytest.raises(ArchiveError, match=f"more than {MAX_MEMBERS} entries"):
        unpack_checkpoint(many_zip, tmp_path / "out-zip", max_bytes=2**20)


@pytest.mark.parametrize("make", [lambda m: tar_of(m, True), zip_of], ids=["tar", "zip"])
def test_member_names_over_255_bytes_are_an_archive_error(tmp_path, make):
    long_name = "intkey_" + "x" * 300 + ".bin"
    with pytest.raises(ArchiveError, match="longer than 255"):
        unpack_checkpoint(make([(long_name, b"data", tarfile.REGTYPE)]), tmp_path / "out", max_bytes=2**20)
