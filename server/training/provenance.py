"""What an adapter records about how it was made: the data (its sha256 and example count), every
training argument, the losses, when, and with which reft-server. It travels in the adapter's
metadata, so any replica or a later `adapters diff` can tell two versions' histories apart."""

from __future__ import annotations

import argparse
import hashlib
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from server.training.trainer import TrainResult

NOT_ARGUMENTS = ("handler", "command")  # argparse plumbing, not training choices


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def training_provenance(args: argparse.Namespace, result: TrainResult, examples: int, data_sha256: str) -> dict:
    arguments = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in sorted(vars(args).items())
        if key not in NOT_ARGUMENTS
    }
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "package_version": version("reft-server"),
        "dataset": {"path": str(args.data), "sha256": data_sha256, "examples": examples},
        "training_arguments": arguments,
        "final_loss": result.final_loss,
        "best_loss": min(result.epoch_losses),
        "epoch_losses": result.epoch_losses,
        "seconds": round(result.seconds, 3),
    }
