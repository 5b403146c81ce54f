"""The adapter store: a directory tree that several server processes may share (one volume).

    <root>/<name>/versions/000007.safetensors   immutable, one per published version
    <root>/<name>/current                       the served version number, replaced atomically
    <root>/.locks/<name>.lock                   serializes publishes/deletes of one name (flock)
    <root>/.tombstones/<name>                   last version of a deleted name: numbers never repeat
    <root>/.tmp/                                files being written

Publishing writes the bytes to .tmp, fsyncs, hard-links them to the next free version number (a
link either fully exists or not), then flips `current` with an atomic rename. A crash at any moment
leaves the old or the new version served, never a partial file. Versions are never renumbered, so
`name@version` means the same bytes forever, across deletes and processes.

Every write takes an optional `Precondition` (compare-and-swap): it is checked under the name's
flock, so it holds across processes sharing the store. An object store would express the same
checks as conditional writes (If-None-Match to create a version, If-Match on the pointer):
server/adapters/object_store.py does, with the same API; server/adapters/stores.py picks one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.reft.config import AdapterConfig

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always fullmatch: "$" would accept "abc\n"
VERSION_SUFFIX = ".safetensors"
MAX_VERSION = 10**9 - 1  # file names hold 6+ digits; a bound keeps absurd numbers away from the filesystem
STALE_TMP_SECONDS = 3600


class StoreError(Exception):
    pass


class InvalidName(StoreError, ValueError):
    pass


class NotFound(StoreError, KeyError):
    def __str__(self) -> str:
        return self.args[0] if self.args else "not found"


class PreconditionFailed(StoreError):
    """The name's current version is not what the writer expected; nothing was changed."""

    def __init__(self, name: str, expected: str, current: int | None):
        state = f"at version {current}" if current is not None else "absent"
        super().__init__(f"precondition failed: adapter {name!r} is {state}, expected {expected}")
        self.current = current


@dataclass(frozen=True)
class Precondition:
    """What a writer expects of a name before its write: current version `version` (If-Match: "N"),
    or that the name exists (`exists=True`, If-Match: *) or does not (`exists=False`, If-None-Match: *)."""

    version: int | None = None
    exists: bool | None = None

    def check(self, name: str, current: int | None) -> None:
        if self.version is not None and current != self.version:
            raise PreconditionFailed(name, f"version {self.version}", current)
        if self.exists is True and current is None:
            raise PreconditionFailed(name, "an existing adapter", current)
        if self.exists is False and current is not None:
            raise PreconditionFailed(name, "no adapter of that name", current)


def served_version(name: str, current: int | None) -> int:
    """The version a name serves; NotFound when it serves none (never published, or deleted)."""
    if current is None:
        raise NotFound(f"adapter {name!r} not found")
    return current


def is_valid_name(name: str) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and ".." not in name


def check_name(name: str) -> str:
    if not is_valid_name(name):
        raise InvalidName(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class VersionInfo:
    version: int
    size: int
    created: float  # unix time


@dataclass(frozen=True)
class Served:
    """What a replica's sync reads of a store in one pass: every served name's current version, and the
    names whose pointer could not be read (why, by name), whose last known version the reader may keep."""

    versions: dict[str, int]
    unreadable: dict[str, str]


@dataclass(frozen=True)
class NameInfo:
    name: str
    current: int
    versions: tuple[VersionInfo, ...]

    def version(self, number: int) -> VersionInfo:
        for info in self.versions:
            if info.version == number:
                return info
        raise NotFound(f"adapter {self.name!r} has no version {number}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class AdapterStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        for sub in (".locks", ".tombstones", ".tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._clean_stale_tmp()

    # -- paths -----------------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def _version_path(self, name: str, version: int) -> Path:
        if not 1 <= version <= MAX_VERSION:
            raise NotFound(f"adapter {name!r} has no version {version}")
        return self._dir(name) / "versions" / f"{version:06d}{VERSION_SUFFIX}"

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with open(self.root / ".locks" / f"{check_name(name)}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _tmp_path(self) -> Path:
        return self.root / ".tmp" / f"{uuid.uuid4().hex}.part"

    def _clean_stale_tmp(self) -> None:
        """Remove what crashed writers left: partial files and the trash directories of deletes
        interrupted between their rename and their rmtree. Best effort: never stops a startup."""
        cutoff = time.time() - STALE_TMP_SECONDS
        for path in (self.root / ".tmp").iterdir():
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime >= cutoff:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()

    # -- reading ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Served names: directories with a readable `current` pointer."""
        found = []
        for entry in self.root.iterdir():
            if is_valid_name(entry.name) and (entry / "current").exists():  # not a dot file, nor one made by hand
                found.append(entry.name)
        return sorted(found)

    def served(self) -> Served:
        versions, unreadable = {}, {}
        for name in self.names():
            try:
                version = self.current_or_none(name)
            except (OSError, ValueError) as e:  # a flaky volume, a pointer written by hand
                unreadable[name] = f"{type(e).__name__}: {e}"
                continue
            if version is not None:  # deleted since it was listed
                versions[name] = version
        return Served(versions, unreadable)

    def current(self, name: str) -> int:
        return served_version(name, self.current_or_none(name))

    def current_or_none(self, name: str) -> int | None:
        try:
            return int((self._dir(name) / "current").read_text().strip())
        except (FileNotFoundError, NotADirectoryError):
            return None

    def versions(self, name: str) -> list[int]:
        try:
            files = (self._dir(name) / "versions").iterdir()
            return sorted(int(p.name[: -len(VERSION_SUFFIX)]) for p in files if p.name.endswith(VERSION_SUFFIX))
        except FileNotFoundError:
            return []

    def info(self, name: str) -> NameInfo:
        current = self.current(name)
        versions = []
        for number in self.versions(name):
            path = self._version_path(name, number)
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                versions.append(VersionInfo(number, stat.st_size, stat.st_mtime))
        return NameInfo(name, current, tuple(versions))

    def version_info(self, name: str, version: int) -> VersionInfo:
        path = self._version_path(name, version)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise NotFound(f"adapter {name!r} has no version {version}") from None
        return VersionInfo(version, stat.st_size, stat.st_mtime)

    def read_config(self, name: str, version: int) -> AdapterConfig:
        """The version's config, from its header alone."""
        from server.adapters.format import read_config  # imports torch: not for every store user

        try:
            return read_config(self._version_path(name, version))
        except FileNotFoundError:
            raise NotFound(f"adapter {name!r} has no version {version}") from None

    def read(self, name: str, version: int | None = None) -> tuple[int, bytes]:
        """(version, bytes) of `version`, or of the current one."""
        number = self.current(name) if version is None else version
        try:
            return number, self._version_path(name, number).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"adapter {name!r} has no version {number}") from None

    # -- writing ---------------------------------------------------------------------------------
    def publish(self, name: str, data: bytes, if_absent: bool = False, precondition: Precondition | None = None) -> int:
        """Store `data` as the next version of `name` and make it current; returns the version.
        With `if_absent`, a name that already exists is left alone and its current version returned.
        A `precondition` that does not hold raises PreconditionFailed and writes nothing."""
        check_name(name)
        tmp = self._tmp_path()
        try:  # a write that fails (a full disk) leaves no partial file behind
            _write_synced(tmp, data)
            with self._locked(name):
                current = self.current_or_none(name)
                if if_absent and current is not None:
                    return current
                if precondition is not None:
                    precondition.check(name, current)
                versions_dir = self._dir(name) / "versions"
                versions_dir.mkdir(parents=True, exist_ok=True)
                version = max([*self.versions(name), self._tombstone(name)]) + 1
                os.link(tmp, self._version_path(name, version))
                _fsync_dir(versions_dir)
                self._set_pointer(name, version)
        finally:
            tmp.unlink(missing_ok=True)
        return version

    def set_current(self, name: str, version: int, precondition: Precondition | None = None) -> None:
        """Serve an existing version (roll back or forward)."""
        with self._locked(name):
            current = self.current_or_none(name)
            if precondition is not None:
                precondition.check(name, current)
            if current is None:
                raise NotFound(f"adapter {name!r} not found")
            if not self._version_path(name, version).exists():
                raise NotFound(f"adapter {name!r} has no version {version}")
            self._set_pointer(name, version)

    def delete(self, name: str, precondition: Precondition | None = None) -> None:
        """Take the name out of service and remove its files. Requests already running keep their
        adapter (it is in memory); numbering continues after the deleted versions if reused."""
        with self._locked(name):
            directory = self._dir(name)
            if precondition is not None:
                precondition.check(name, self.current_or_none(name))
            if not directory.exists():
                raise NotFound(f"adapter {name!r} not found")
            last = max([*self.versions(name), self._tombstone(name)])
            tombstone = self._tmp_path()
            _write_synced(tombstone, f"{last}\n".encode())
            os.replace(tombstone, self.root / ".tombstones" / name)
            trash = self.root / ".tmp" / f"deleted-{name}-{uuid.uuid4().hex}"
            os.rename(directory, trash)  # atomic: the name disappears at once
            _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def _tombstone(self, name: str) -> int:
        try:
            return int((self.root / ".tombstones" / name).read_text().strip())
        except FileNotFoundError:
            return 0

    def _set_pointer(self, name: str, version: int) -> None:
        tmp = self._tmp_path()
        try:
            _write_synced(tmp, f"{version}\n".encode())
            os.replace(tmp, self._dir(name) / "current")
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self._dir(name))
