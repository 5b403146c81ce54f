"""Unpack an uploaded pyreft checkpoint archive (.tar, .tar.gz, .zip) safely.

Only the files a pyreft checkpoint holds are taken (config.json and intkey_*.bin, from any one
folder inside the archive); links, devices, absolute or parent paths are refused, and sizes are
bounded so an archive bomb cannot fill the disk.
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

WANTED = re.compile(r"^(config\.json|intkey_.+\.bin)$")
MAX_MEMBERS = 4096
MAX_TOTAL_BYTES = 4 * 2**30


class ArchiveError(ValueError):
    pass


def _safe_member_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"unsafe path in archive: {name!r}")
    return path


def _collect(entries, limit: int) -> dict[str, bytes]:
    """entries: (name, size, is_regular_file, read) -> {file name: bytes} of the checkpoint files."""
    found: dict[str, tuple[PurePosixPath, bytes]] = {}
    total = 0
    for count, (name, size, regular, read) in enumerate(entries, start=1):
        if count > MAX_MEMBERS:
            raise ArchiveError(f"more than {MAX_MEMBERS} entries in the archive")
        path = _safe_member_name(name)
        if not regular or not WANTED.match(path.name):
            continue
        total += size
        if total > limit:
            raise ArchiveError(f"the checkpoint files exceed {limit} bytes unpacked")
        if path.name in found:
            raise ArchiveError(f"{path.name} appears twice in the archive")
        found[path.name] = (path.parent, read())
    folders = {parent for parent, _ in found.values()}
    if len(folders) > 1:
        raise ArchiveError(f"checkpoint files are spread over several folders: {sorted(map(str, folders))}")
    return {name: data for name, (_, data) in found.items()}


def unpack_checkpoint(data: bytes, target: Path, limit: int = MAX_TOTAL_BYTES) -> Path:
    """Write the checkpoint files found in `data` into `target`; returns `target`."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = (
                (
                    info.filename,
                    info.file_size,
                    not info.is_dir() and not _zip_is_link(info),
                    lambda i=info: archive.read(i),
                )
                for info in archive.infolist()
            )
            files = _collect(entries, limit)
    else:
        try:
            archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        except tarfile.TarError:
            raise ArchiveError("the upload is neither a zip nor a tar archive") from None
        with archive:
            entries = (
                (m.name, m.size, m.isreg(), lambda m=m: archive.extractfile(m).read()) for m in archive.getmembers()
            )
            files = _collect(entries, limit)
    if not files:
        raise ArchiveError("no pyreft checkpoint files (intkey_*.bin) in the archive")
    target.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (target / name).write_bytes(content)
    return target


def _zip_is_link(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000
