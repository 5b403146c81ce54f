"""The adapter store on an S3-compatible object store (AWS S3, MinIO, Ceph RGW, R2), for replicas
that share no POSIX volume. Same API and guarantees as the directory store (server/adapters/store.py).

    <prefix>pointers/<name>                  JSON: current version, last number ever given, live versions
    <prefix>blobs/<name>/<uuid>.safetensors  one immutable object per version, never rewritten
    <prefix>.probe/<uuid>                    written and removed at startup to test conditional writes

The pointer is the only mutable object and every change to a name is one conditional PUT of it:
If-Match on the ETag that was read (If-None-Match: * for a new name), so of two writers that read
the same pointer exactly one wins and the other re-reads and re-checks its precondition. Version
numbers are handed out by that swap from `last`, which survives deletes (the pointer of a deleted
name stays, with no current version), so numbers are never reused. A publisher first uploads its
bytes under a fresh key (If-None-Match: *), then swaps the pointer: a crash leaves an unreferenced
object, never a partial version; replicas remove such objects once they are an hour old.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from server.adapters.store import (
    MAX_VERSION,
    STALE_TMP_SECONDS,
    VERSION_SUFFIX,
    NameInfo,
    NotFound,
    Precondition,
    Served,
    StoreError,
    VersionInfo,
    check_name,
    is_valid_name,
    served_version,
)

if TYPE_CHECKING:
    from server.reft.config import AdapterConfig

log = logging.getLogger(__name__)

ENDPOINT_VARIABLE = "REFT_S3_ENDPOINT_URL"  # boto3 itself also reads AWS_ENDPOINT_URL(_S3)
LOST_RACE_STATUSES = (409, 412)  # 409: S3's ConditionalRequestConflict between concurrent conditional writes


class ObjectStoreError(StoreError, OSError):
    """The object store could not be reached or refused a request (credentials, bucket, network)."""


class ConditionalWritesUnsupported(StoreError):
    pass


@dataclass(frozen=True)
class _Pointer:
    etag: str | None  # None: no pointer object yet
    current: int | None = None
    last: int = 0
    versions: dict[int, dict] = field(default_factory=dict)  # number -> {"key", "size", "created"}
    generation: str | None = None  # unique to the write that made it

    @classmethod
    def parse(cls, etag: str, body: bytes) -> _Pointer:
        state = json.loads(body)
        versions = {int(number): entry for number, entry in state["versions"].items()}
        return cls(etag, state["current"], state["last"], versions, state.get("generation"))

    def body(self, generation: str) -> bytes:
        # the generation makes every pointer body unique, so an ETag is never seen twice (no ABA on roll-backs)
        versions = {str(number): entry for number, entry in sorted(self.versions.items())}
        state = {"current": self.current, "last": self.last, "versions": versions, "generation": generation}
        return json.dumps(state).encode()


def parse_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/")."""
    if not url.startswith("s3://"):
        raise StoreError(f"not an s3:// store location: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise StoreError(f"{url!r} names no bucket: use s3://bucket or s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _status(error) -> int:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


class ObjectStore:
    def __init__(self, url: str, endpoint_url: str | None = None, orphan_age: float = STALE_TMP_SECONDS):
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        endpoint = endpoint_url or os.environ.get(ENDPOINT_VARIABLE) or None
        self.client = boto3.client("s3", endpoint_url=endpoint)  # credentials: the standard AWS chain
        self._pointers: dict[str, _Pointer] = {}  # last read, by name: a listing re-reads only those that changed
        self._cache_lock = threading.Lock()
        self._probe_conditional_writes()
        self._remove_orphans(orphan_age)

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    # -- low-level requests ----------------------------------------------------------------------
    def _call(self, operation: str, **kwargs):
        """One S3 request; a 412/409 comes back as None (a lost conditional write), other failures
        as ObjectStoreError."""
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as e:
            if isinstance(e, ClientError) and _status(e) in LOST_RACE_STATUSES:
                return None
            if isinstance(e, ClientError) and _status(e) == 404 and operation in ("get_object", "head_object"):
                raise FileNotFoundError(kwargs.get("Key")) from None
            raise ObjectStoreError(f"object store {self.url}: {operation} failed: {e}") from None

    def _pointer_key(self, name: str) -> str:
        return f"{self.prefix}pointers/{check_name(name)}"

    def _read_pointer(self, name: str) -> _Pointer:
        try:
            response = self._call("get_object", Key=self._pointer_key(name))
        except FileNotFoundError:
            return _Pointer(etag=None)
        etag = response["ETag"]
        try:
            pointer = _Pointer.parse(etag, response["Body"].read())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ObjectStoreError(f"object store {self.url}: unreadable pointer of {name!r} (ETag {etag})") from None
        with self._cache_lock:
            self._pointers[name] = pointer
        return pointer

    def _swap(self, name: str, old: _Pointer, new: _Pointer) -> bool:
        """Replace the pointer if it is still `old`; False when another writer got there first. A swap
        whose answer was lost (a timeout; or botocore's retry, refused because the first try had moved
        the ETag) is known by the pointer read back: it still carries this swap's generation."""
        condition = {"IfMatch": old.etag} if old.etag is not None else {"IfNoneMatch": "*"}
        generation = uuid.uuid4().hex
        try:
            answer = self._call("put_object", Key=self._pointer_key(name), Body=new.body(generation), **condition)
        except ObjectStoreError:
            if self._landed(name, generation):
                return True
            raise
        return answer is not None or self._landed(name, generation)

    def _landed(self, name: str, generation: str) -> bool:
        try:
            return self._read_pointer(name).generation == generation
        except ObjectStoreError:
            return False

    def _list(self, prefix: str) -> list[dict]:
        objects = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                objects.extend(page.get("Contents", []))
        except (BotoCoreError, ClientError) as e:
            raise ObjectStoreError(f"object store {self.url}: listing {prefix!r} failed: {e}") from None
        return objects

    # -- startup ---------------------------------------------------------------------------------
    def _probe_conditional_writes(self) -> None:
        """Every guarantee rests on the store refusing stale conditional writes: check it does."""
        key = f"{self.prefix}.probe/{uuid.uuid4().hex}"
        created = self._call("put_object", Key=key, Body=b"1", IfNoneMatch="*")
        try:
            if created is None:
                raise ConditionalWritesUnsupported("a fresh key was refused")
            if self._call("put_object", Key=key, Body=b"2", IfNoneMatch="*") is not None:
                raise ConditionalWritesUnsupported("If-None-Match: * overwrote an existing object")
            replaced = self._call("put_object", Key=key, Body=b"3", IfMatch=created["ETag"])
            if replaced is None:
                raise ConditionalWritesUnsupported("If-Match with the current ETag was refused")
            if self._call("put_object", Key=key, Body=b"4", IfMatch=created["ETag"]) is not None:
                raise ConditionalWritesUnsupported("If-Match with a stale ETag was accepted")
        except ConditionalWritesUnsupported as e:
            raise ConditionalWritesUnsupported(
                f"object store {self.url} does not honour conditional writes ({e}); replicas could overwrite "
                "each other's adapters, so the store is refused. Use one that does (AWS S3, MinIO, Ceph RGW, R2) "
                "or a shared directory."
            ) from None
        finally:
            self._call("delete_object", Key=key)

    def _remove_orphans(self, min_age: float) -> None:
        """Delete version objects no pointer refers to (publishers that crashed or lost a race and
        died before cleaning up). Only old ones: a young one may be a publish about to swap."""
        referenced = set()
        for name in self._listed_pointers():
            try:
                referenced.update(entry["key"] for entry in self._read_pointer(name).versions.values())
            except ObjectStoreError as e:  # what it refers to is unknown: any object may be one of its versions
                log.error("object store %s: orphans are not removed: %s", self.url, e)
                return
        cutoff = time.time() - min_age
        for obj in self._list(f"{self.prefix}blobs/"):
            if obj["Key"] not in referenced and obj["LastModified"].timestamp() <= cutoff:
                self._call("delete_object", Key=obj["Key"])

    # -- reading ---------------------------------------------------------------------------------
    def _listed_pointers(self) -> dict[str, str]:
        """name -> pointer ETag, for every name ever published (deleted ones included). Keys no publish
        makes (the empty "folder" key consoles and s3fs leave, names written by hand) are passed over."""
        start = f"{self.prefix}pointers/"
        listed = {obj["Key"][len(start) :]: obj["ETag"] for obj in self._list(start)}
        return {name: etag for name, etag in listed.items() if is_valid_name(name)}

    def served(self) -> Served:
        """One listing, plus a read of each pointer that changed since it was last read: the names that did
        not change cost no request (a sync every few seconds reads only what other replicas wrote)."""
        versions, unreadable = {}, {}
        for name, etag in self._listed_pointers().items():
            with self._cache_lock:
                pointer = self._pointers.get(name)
            if pointer is None or pointer.etag != etag:
                try:
                    pointer = self._read_pointer(name)
                except ObjectStoreError as e:
                    unreadable[name] = str(e)
                    continue
            if pointer.current is not None:
                versions[name] = pointer.current
        return Served(versions, unreadable)

    def names(self) -> list[str]:
        """Served names, and those whose pointer cannot be read (their `info` says why), as a directory
        store lists every name with a `current` file without reading it."""
        served = self.served()
        return sorted([*served.versions, *served.unreadable])

    def current(self, name: str) -> int:
        return served_version(name, self.current_or_none(name))

    def current_or_none(self, name: str) -> int | None:
        return self._read_pointer(name).current

    def versions(self, name: str) -> list[int]:
        return sorted(self._read_pointer(name).versions)

    def info(self, name: str) -> NameInfo:
        pointer = self._read_pointer(name)
        if pointer.current is None:
            raise NotFound(f"adapter {name!r} not found")
        versions = tuple(_version_info(number, entry) for number, entry in sorted(pointer.versions.items()))
        return NameInfo(name, pointer.current, versions)

    def version_info(self, name: str, version: int) -> VersionInfo:
        return _version_info(version, self._entry(self._read_pointer(name), name, version))

    def read(self, name: str, version: int | None = None) -> tuple[int, bytes]:
        """(version, bytes) of `version`, or of the current one."""
        pointer = self._read_pointer(name)
        number = pointer.current if version is None else version
        if number is None:
            raise NotFound(f"adapter {name!r} not found")
        return number, self._get(name, number, self._entry(pointer, name, number)["key"])

    def read_config(self, name: str, version: int) -> AdapterConfig:
        """The version's config, from two ranged reads of its header (no tensors fetched)."""
        from server.adapters.format import MAX_HEADER_BYTES, config_from_header  # imports torch: only here

        key = self._entry(self._read_pointer(name), name, version)["key"]
        prefix = self._get(name, version, key, "bytes=0-7")
        header_len = min(int.from_bytes(prefix, "little"), MAX_HEADER_BYTES) if len(prefix) == 8 else 0
        header = self._get(name, version, key, f"bytes=8-{7 + header_len}") if header_len else b""
        return config_from_header(prefix + header)

    def _get(self, name: str, version: int, key: str, byte_range: str | None = None) -> bytes:
        try:
            response = self._call("get_object", Key=key, **({"Range": byte_range} if byte_range else {}))
        except FileNotFoundError:  # deleted since the pointer was read
            raise NotFound(f"adapter {name!r} has no version {version}") from None
        return response["Body"].read()

    @staticmethod
    def _entry(pointer: _Pointer, name: str, version: int) -> dict:
        entry = pointer.versions.get(version)
        if entry is None:
            raise NotFound(f"adapter {name!r} has no version {version}")
        return entry

    # -- writing ---------------------------------------------------------------------------------
    def publish(self, name: str, data: bytes, if_absent: bool = False, precondition: Precondition | None = None) -> int:
        """Store `data` as the next version of `name` and make it current; returns the version.
        With `if_absent`, a name that already exists is left alone and its current version returned.
        A `precondition` that does not hold raises PreconditionFailed and serves nothing new."""
        key = f"{self.prefix}blobs/{check_name(name)}/{uuid.uuid4().hex}{VERSION_SUFFIX}"
        uploaded = False
        try:
            while True:
                pointer = self._read_pointer(name)
                if uploaded and (landed := _version_of(pointer, key)) is not None:
                    uploaded = False  # the last swap was applied, though its answer was lost and retried
                    return landed
                if if_absent and pointer.current is not None:
                    return pointer.current
                if precondition is not None:
                    precondition.check(name, pointer.current)
                if not uploaded:  # once: a lost swap retries with the same object under the next number
                    if self._call("put_object", Key=key, Body=data, IfNoneMatch="*") is None:
                        raise ObjectStoreError(f"object store {self.url}: a fresh key {key!r} was refused")
                    uploaded, created = True, time.time()
                version = pointer.last + 1
                if version > MAX_VERSION:
                    raise StoreError(f"adapter {name!r} has used every version number")
                entry = {"key": key, "size": len(data), "created": created}
                new = _Pointer(None, version, version, {**pointer.versions, version: entry})
                try:
                    swapped = self._swap(name, pointer, new)
                except Exception:  # its answer may have been lost after the swap was applied
                    try:
                        swapped = self._served_as(name, key) == version
                    except Exception:
                        swapped = False
                    if not swapped:
                        raise
                if swapped:
                    uploaded = False  # served now: keep it
                    return version
        finally:  # a failed publish deletes its object only if no pointer can serve it
            if uploaded:
                try:
                    unserved = self._served_as(name, key) is None
                except Exception:  # unknown: an orphan is removed at a later start, a served object never
                    unserved = False
                if unserved:
                    self._call("delete_object", Key=key)

    def _served_as(self, name: str, key: str) -> int | None:
        """The version whose object is `key` in the name's pointer as it is now, if any."""
        return _version_of(self._read_pointer(name), key)

    def _pointer_to_change(self, name: str, precondition: Precondition | None) -> _Pointer:
        """The pointer of a served name, read for a roll-back or a delete, its precondition checked."""
        pointer = self._read_pointer(name)
        if precondition is not None:
            precondition.check(name, pointer.current)
        served_version(name, pointer.current)
        return pointer

    def set_current(self, name: str, version: int, precondition: Precondition | None = None) -> None:
        """Serve an existing version (roll back or forward)."""
        while True:
            pointer = self._pointer_to_change(name, precondition)
            self._entry(pointer, name, version)
            if self._swap(name, pointer, _Pointer(None, version, pointer.last, pointer.versions)):
                return

    def delete(self, name: str, precondition: Precondition | None = None) -> None:
        """Take the name out of service, then remove its objects. Requests already running keep their
        adapter (it is in memory); numbering continues after the deleted versions if reused."""
        while True:
            pointer = self._pointer_to_change(name, precondition)
            if self._swap(name, pointer, _Pointer(None, None, pointer.last, {})):
                break
        for entry in pointer.versions.values():  # a crash here leaves orphans, removed at a later startup
            self._call("delete_object", Key=entry["key"])


def _version_of(pointer: _Pointer, key: str) -> int | None:
    """The version whose object is `key`, if the pointer lists it."""
    return next((number for number, entry in pointer.versions.items() if entry["key"] == key), None)


def _version_info(number: int, entry: dict) -> VersionInfo:
    return VersionInfo(number, entry["size"], entry["created"])
