"""Adapters pulled from the Hugging Face Hub: a pyreft checkpoint pushed with pyreft's
`save(..., save_to_hf_hub=True)` (intkey_*.bin files, positions and weight sharing given by the
caller as for import-pyreft), or a repo holding one of this server's .safetensors adapters.

Downloads go through huggingface_hub (its cache, HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE). The repo
id, the revision asked for and the commit it resolved to are recorded in the adapter's provenance,
so `name@version` can be traced back to the exact files it came from.

The files a pull fetches may come to the adapter upload limit at most: their sizes are asked of the
Hub before anything downloads (a repo id naming a full model is refused, not fetched whole), and the
commit checked is the one downloaded. When the Hub cannot be asked (offline mode, unreachable), the
pull takes what huggingface_hub's cache holds, and checks the cached files instead.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ByteSize

from server.adapters.errors import AdapterError
from server.adapters.format import AdapterFile
from server.adapters.model_shape import ModelShape
from server.adapters.options import AdapterOptions
from server.adapters.pyreft import import_pyreft
from server.adapters.validation import validate

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
WANTED_FILES = ["intkey_*.bin", "config.json", "*.safetensors"]


class HubError(Exception):
    """The repo or revision could not be fetched; `status` is the HTTP status that says why: 404 missing
    (or, offline, not in the local cache), 403 gated or private, 400 an id the Hub refuses, 413 files
    over the size limit, 502 the Hub unreachable or failing (or not saying how big its files are)."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


class InvalidHubRef(HubError, ValueError):
    def __init__(self, message: str):
        super().__init__(message, 400)


def _status(error: Exception) -> int:
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return 403
    missing = (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError)
    if isinstance(error, missing):  # LocalEntryNotFoundError (offline, not cached) is an EntryNotFoundError
        return 404
    return 400 if isinstance(error, ValueError) else 502


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None

    @classmethod
    def parse(cls, text: str) -> HubRef:
        """REPO_ID or REPO_ID@REVISION (a branch, tag or commit)."""
        repo_id, _, revision = text.partition("@")
        # huggingface_hub joins the revision into its cache's refs/ path: no ".." there either
        if not REPO_ID.fullmatch(repo_id) or ".." in text or (text.count("@") and not revision):
            raise InvalidHubRef(f"invalid Hub reference {text!r}: use owner/name or owner/name@revision")
        return cls(repo_id, revision or None)

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def download(ref: HubRef, max_bytes: int) -> tuple[Path, str]:
    """(local snapshot directory, resolved commit) of the adapter files of `ref`, which may come to
    `max_bytes` at most."""
    from huggingface_hub import snapshot_download

    with _fetch_errors(ref):
        listing = _listing(ref)
    if listing is None:  # as huggingface_hub itself falls back: the cache alone, nothing downloads
        with _fetch_errors(ref):
            path = _cached_snapshot(ref)
        _check_size(ref, _cached_sizes(path), max_bytes)
    else:
        _check_size(ref, _listed_sizes(listing), max_bytes)
        with _fetch_errors(ref):  # the commit checked, not the branch: a push meanwhile changes nothing
            path = Path(snapshot_download(ref.repo_id, revision=listing.sha, allow_patterns=WANTED_FILES))
        _remember_revision(ref, path)
    return path, path.name  # snapshots are stored under their commit hash


def _listing(ref: HubRef):
    """The Hub's ModelInfo of `ref` with its files' sizes, or None when the Hub cannot be asked."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

    try:
        return HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    except HfHubHTTPError:
        raise  # the Hub answered: missing, gated, failing
    except (OfflineModeIsEnabled, HTTPError):  # offline mode, or the HTTP client's own: the Hub unreachable
        return None


def _cached_snapshot(ref: HubRef) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=WANTED_FILES, local_files_only=True)
        )
    except LocalEntryNotFoundError:
        reason = "the Hub cannot be reached (or HF_HUB_OFFLINE is set) and the local cache does not hold it"
        raise HubError(f"cannot fetch {ref} from the Hugging Face Hub: {reason}", 404) from None


def _remember_revision(ref: HubRef, snapshot: Path) -> None:
    """Record the branch or tag -> commit in the cache's refs/, as a download by branch does (one by commit
    does not), so that an offline pull by the same name finds this snapshot."""
    from huggingface_hub.constants import DEFAULT_REVISION

    revision = ref.revision or DEFAULT_REVISION
    if revision != snapshot.name:
        recorded = snapshot.parent.parent / "refs" / revision
        recorded.parent.mkdir(parents=True, exist_ok=True)
        written = recorded.with_name(f"{recorded.name}.{uuid.uuid4().hex}.tmp")
        written.write_text(snapshot.name)
        written.replace(recorded)  # at once: a concurrent reader never sees half a commit hash


@contextmanager
def _fetch_errors(ref: HubRef) -> Iterator[None]:
    """huggingface_hub's failures as HubErrors that say why."""
    from huggingface_hub.errors import HTTPError

    try:
        yield
    except (OSError, ValueError, HTTPError) as e:  # its HTTP, offline, not-cached and invalid-id errors are these
        message = f"cannot fetch {ref} from the Hugging Face Hub: {str(e).splitlines()[0]}"
        raise HubError(message, _status(e)) from None


def _listed_sizes(listing) -> dict[str, int | None]:
    sizes = {sibling.rfilename: sibling.size for sibling in listing.siblings or []}
    return {name: sizes[name] for name in _wanted(sizes)}


def _cached_sizes(directory: Path) -> dict[str, int]:
    files = (path for path in directory.rglob("*") if path.is_file())
    sizes = {path.relative_to(directory).as_posix(): path.stat().st_size for path in files}
    return {name: sizes[name] for name in _wanted(sizes)}


def _wanted(names) -> list[str]:
    """The names snapshot_download fetches: its own filter, so that the check counts what it downloads."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(names, allow_patterns=WANTED_FILES))


def _check_size(ref: HubRef, sizes: dict[str, int | None], max_bytes: int) -> None:
    unknown = sorted(name for name, size in sizes.items() if size is None)
    if unknown:  # fetched anyway, nothing would bound them
        raise HubError(f"{ref}: the Hub does not say how big {', '.join(unknown)} is: not fetched", 502)
    total = sum(sizes.values())
    if total > max_bytes:
        raise HubError(
            f"{ref}: the files a pull fetches come to {ByteSize(total).human_readable()}, over the "
            f"adapter size limit of {ByteSize(max_bytes).human_readable()} (--max-upload-size): is it a model?",
            413,
        )


def pull(
    ref: HubRef, options: AdapterOptions, max_bytes: int, base_model: str = "", model: ModelShape | None = None
) -> AdapterFile:
    """The adapter at `ref` (its files `max_bytes` at most), validated against `model` when given, with
    its Hub provenance."""
    directory, commit = download(ref, max_bytes)
    if any(directory.glob("intkey_*.bin")):
        if options.positions is None:
            raise AdapterError("positions", f"{ref.repo_id} is a pyreft checkpoint: give the positions it used")
        adapter = import_pyreft(directory, **options.fields(), base_model=base_model, model=model)
    else:
        adapter = AdapterFile.load(_single_safetensors(directory, ref.repo_id))
        if model is not None:
            validate(adapter, model)
    source = {"hub": {"repo_id": ref.repo_id, "revision": ref.revision or "main", "commit": commit}}
    adapter.config = dataclasses.replace(adapter.config, provenance={**adapter.config.provenance, **source})
    return adapter


def _single_safetensors(directory: Path, repo_id: str) -> Path:
    found = sorted(directory.glob("*.safetensors"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise AdapterError("repo", f"{repo_id} has {what} .safetensors files and no pyreft checkpoint: expected one")
    return found[0]
