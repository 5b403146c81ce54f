"""Where a base model given as `--model` is: a local directory or a Hugging Face Hub id.

transformers takes any text that is not an existing directory for a Hub id, so a mistyped local
path ends in a Hub lookup and a message about repo ids or the network. Text that cannot be a Hub id
(an absolute or relative path, `~`, more than one `/`) or whose first component is a local directory
is a local path here, and must be a model directory; one that is served must hold its tokenizer too.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from server.adapters.hub import REPO_ID

# the files transformers builds a tokenizer from (a whole tokenizer, its config, or one kind of
# vocabulary): a directory with none of them holds a model without its tokenizer
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "tekken.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


class ModelNotFound(ValueError):
    pass


def model_location(text: str) -> str:
    """What transformers should load for `text`: a model directory (`~` expanded) or a Hub id as given."""
    path = Path(os.path.expanduser(text))  # not Path.expanduser: it raises for an unknown ~user
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{text}: no config.json in this directory: not a transformers model")
        return str(path)
    if path.exists():
        raise ModelNotFound(f"{text}: not a directory: give the model's directory")
    if _looks_local(text):
        raise ModelNotFound(f"{text}: no such directory (a Hub id is owner/name)")
    return text


def check_tokenizer(location: str) -> None:
    """A model directory (as model_location gives it) holds a tokenizer too; a Hub id is transformers' to resolve."""
    directory = Path(location)
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFound(f"{location}: no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)})")


def model_argument(text: str) -> str:
    """model_location as an argparse type: a local path that is no model is a usage error (exit 2)."""
    try:
        return model_location(text)
    except ModelNotFound as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def model_with_tokenizer_argument(text: str) -> str:
    """model_argument for a command that uses the model's tokenizer too: a directory without it is a usage error."""
    location = model_argument(text)
    try:
        check_tokenizer(location)
    except ModelNotFound as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return location


def _looks_local(text: str) -> bool:
    return not REPO_ID.fullmatch(text) or ("/" in text and Path(text).parent.is_dir())
