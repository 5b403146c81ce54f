"""Adapters pulled from the Hugging Face Hub: a pyreft checkpoint pushed with pyreft's
`save(..., save_to_hf_hub=True)` (intkey_*.bin files, positions and weight sharing given by the
caller as for import-pyreft), or a repo holding one of this server's .safetensors adapters.

Downloads go through huggingface_hub (its cache, HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE). The repo
id, the revision asked for and the commit it resolved to are recorded in the adapter's provenance,
so `name@version` can be traced back to the exact files it came from.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

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
    (or, offline, not in the local cache), 403 gated or private, 400 an id the Hub refuses, 502 the Hub
    unreachable or failing."""

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


def download(ref: HubRef) -> tuple[Path, str]:
    """(local snapshot directory, resolved commit) of the adapter files of `ref`."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=WANTED_FILES))
    except (OSError, ValueError) as e:  # its HTTP, offline, not-cached and invalid-id errors are these
        where = f"{ref.repo_id}@{ref.revision}" if ref.revision else ref.repo_id
        message = f"cannot fetch {where} from the Hugging Face Hub: {str(e).splitlines()[0]}"
        raise HubError(message, _status(e)) from None
    return path, path.name  # snapshots are stored under their commit hash


def pull(ref: HubRef, options: AdapterOptions, base_model: str = "", model: ModelShape | None = None) -> AdapterFile:
    """The adapter at `ref`, validated against `model` when given, with its Hub provenance."""
    directory, commit = download(ref)
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
