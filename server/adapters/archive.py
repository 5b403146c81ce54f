"""Unpack an uploaded pyreft checkpoint archive (.tar, .tar.gz/.bz2/.xz, .zip) safely.

Only the files a pyreft checkpoint holds are taken (config.json and intkey_*.bin, from any one
folder inside the archive); links, devices, absolute or parent paths and over-long names are
refused. Everything is streamed and counted as it is read, never trusted from headers: the
checkpoint files may unpack to at most `max_bytes` (the upload limit: a checkpoint is weights,
which barely compress), a tar stream to at most twice that (headers, padding, skipped members),
and the archive may list at most MAX_MEMBERS entries; reading stops the moment a bound is crossed,
so an archive bomb costs neither memory nor much time.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

WANTED = re.compile(r"^(config\.json|intkey_.+\.bin)$")
MAX_MEMBERS = 4096
MAX_NAME_BYTES = 255  # a file name's limit on common filesystems
CHUNK_BYTES = 1 << 20
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive


class ArchiveError(ValueError):
    pass


def unpack_checkpoint(data: bytes, target: Path, *, max_bytes: int) -> Path:
    """Write the checkpoint files found in `data` into `target`; returns `target`.

    A zip is recognised by its signature at offset 0, not by `zipfile.is_zipfile`, which also
    accepts a tar holding a zip (a torch `.bin` is one)."""
    target.mkdir(parents=True, exist_ok=True)
    writer = _CheckpointWriter(target, max_bytes)
    if data[:4] in ZIP_SIGNATURES:
        _unpack_zip(data, writer)
    else:
        _unpack_tar(data, writer, stream_limit=2 * max_bytes)
    if not writer.written:
        raise ArchiveError("no pyreft checkpoint files (intkey_*.bin) in the archive")
    return target


class _CheckpointWriter:
    """Writes wanted members as they stream by, keeping the checks that span the whole archive."""

    def __init__(self, target: Path, max_bytes: int):
        self.target = target
        self.max_bytes = max_bytes
        self.total = 0
        self.members = 0
        self.folder: PurePosixPath | None = None
        self.written: set[str] = set()

    def wants(self, name: str, regular: bool) -> PurePosixPath | None:
        """Count the entry; its safe path when it is a checkpoint file to write, else None."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise ArchiveError(f"more than {MAX_MEMBERS} entries in the archive")
        path = _safe_member_name(name)
        if not regular or not WANTED.match(path.name):
            return None
        if path.name in self.written:
            raise ArchiveError(f"{path.name} appears twice in the archive")
        if self.folder is not None and path.parent != self.folder:
            raise ArchiveError(f"checkpoint files are spread over several folders: {self.folder}, {path.parent}")
        self.folder = path.parent
        return path

    def write(self, path: PurePosixPath, chunks: Iterator[bytes]) -> None:
        self.written.add(path.name)
        with open(self.target / path.name, "wb") as out:
            for chunk in chunks:
                self.total += len(chunk)
                if self.total > self.max_bytes:
                    raise ArchiveError(f"the checkpoint files exceed {self.max_bytes} bytes unpacked")
                out.write(chunk)


def _safe_member_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"unsafe path in archive: {name[:100]!r}")
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for part in path.parts):
        raise ArchiveError(f"a name in the archive is longer than {MAX_NAME_BYTES} bytes: {name[:100]!r}...")
    return path


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


# -- zip ---------------------------------------------------------------------------------------------
ZIP_READ_ERRORS = (zipfile.BadZipFile, NotImplementedError, ValueError, OSError, EOFError, RuntimeError, zlib.error)


def _unpack_zip(data: bytes, writer: _CheckpointWriter) -> None:
    _check_zip_entry_count(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                path = writer.wants(info.filename, not info.is_dir() and not _zip_is_link(info))
                if path is not None:
                    with archive.open(info) as member:
                        writer.write(path, _chunks(member))
    except ArchiveError:
        raise
    except ZIP_READ_ERRORS as e:
        raise ArchiveError(f"the zip archive is corrupt or unsupported ({type(e).__name__})") from None


def _check_zip_entry_count(data: bytes) -> None:
    """Refuse a zip that declares too many entries before zipfile parses its whole directory into
    memory; the declared count sits in the end-of-central-directory record (0xFFFF means zip64)."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - (1 << 16) - 22))
    if end < 0 or len(data) < end + 12:
        raise ArchiveError("not a readable zip archive (no end of central directory)")
    (declared,) = struct.unpack("<H", data[end + 10 : end + 12])
    if declared > MAX_MEMBERS:
        raise ArchiveError(f"more than {MAX_MEMBERS} entries in the archive")


def _zip_is_link(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


# -- tar ---------------------------------------------------------------------------------------------
def _unpack_tar(data: bytes, writer: _CheckpointWriter, stream_limit: int) -> None:
    stream = _BoundedReader(_decompressed(data), stream_limit)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:  # stream mode: members in order, once
            for member in archive:
                path = writer.wants(member.name, member.isreg())
                if path is not None:
                    writer.write(path, _chunks(archive.extractfile(member)))
    except ArchiveError:
        raise
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as e:
        raise ArchiveError(
            f"the upload is neither a zip nor a tar archive, or is corrupt ({type(e).__name__})"
        ) from None


def _decompressed(data: bytes) -> BinaryIO:
    raw = io.BytesIO(data)
    if data[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)
    if data[:3] == b"BZh":
        return bz2.BZ2File(raw)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)
    return raw


class _BoundedReader(io.RawIOBase):
    """A read-only stream that fails once more than `limit` bytes have been read through it."""

    def __init__(self, inner: BinaryIO, limit: int):
        self.inner = inner
        self.limit = limit
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        wanted = self.limit + 1 - self.consumed if size is None or size < 0 else min(size, self.limit + 1)
        chunk = self.inner.read(wanted)
        self.consumed += len(chunk)
        if self.consumed > self.limit:
            raise ArchiveError(f"the archive unpacks to more than {self.limit} bytes")
        return chunk
