"""Where adapters are stored, from one setting: a directory (shared by replicas through a POSIX
volume with working flock) or `s3://bucket/prefix` (any S3-compatible store with conditional
writes). Both backends have one API, so callers open a store here and never ask which it is."""

from __future__ import annotations

from pathlib import Path

from server.adapters.store import AdapterStore, StoreError

OBJECT_STORE_SCHEME = "s3://"


def check_location(location: str) -> str:
    """`location` when open_store takes its form (settings check it at start-up, before a model loads)."""
    if "://" in location and not location.startswith(OBJECT_STORE_SCHEME):
        raise StoreError(f"unsupported store {location!r}: give a directory or s3://bucket/prefix")
    return location


def open_store(location: str | Path):
    """The store at `location`: an AdapterStore (directory) or an ObjectStore (s3://...)."""
    text = check_location(str(location))
    if text.startswith(OBJECT_STORE_SCHEME):
        try:
            from server.adapters.object_store import ObjectStore
        except ImportError:
            raise StoreError(f"{text}: object stores need boto3: pip install 'reft-server[s3]'") from None
        return ObjectStore(text)
    try:
        return AdapterStore(text)
    except OSError as e:  # a file in the way, a read-only volume: a message, not a traceback
        raise StoreError(f"cannot open the store {text!r}: {e.strerror or e}") from None
