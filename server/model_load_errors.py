"""A model whose files cannot be loaded: `reft-server serve` says so in one line and exits 2 (main()
says a ModelLoadError as it says a StartUpMistake), rather than with transformers' traceback, in
whichever process loads it.

`loading` is the seam: it wraps the calls into transformers that read the model's files, and turns
the errors that mean "these files cannot be loaded" into a `ModelLoadError` naming --model and the path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

# What transformers 5 raises for files it cannot load (5.24, each tried on a tiny Llama):
# - OSError: a file missing or unreadable, a config.json that is not JSON, a Hub id that names no model;
# - ValueError: a model_type unknown (transformers' KeyError, re-raised) or missing, a tokenizer file
#   that is not JSON (json's error) or not UTF-8 (the codec's), both ValueErrors;
# - SafetensorError: weights truncated, empty or not safetensors;
# - StrictDataclassError: a config value of the wrong type (hidden_size "abc").
# Not KeyError, TypeError, AttributeError nor RuntimeError, though transformers raises them for some files
# it parses (an unknown rope type, a tokenizer.json without its keys, weights of other shapes): a bug raises
# them too, and their message names neither file nor field, so they keep their traceback.
FILE_ERRORS = (OSError, ValueError, SafetensorError, StrictDataclassError)


class ModelLoadError(ValueError):
    """The model's files (`part` of them: "it", "its tokenizer") cannot be loaded, for `reason`. Not a
    StartUpMistake: start_checks imports the loader, and the loader importing it back would be a cycle."""

    def __init__(self, path: str, part: str, reason: str):
        super().__init__(path, part, reason)  # these args: an engine process sends it back pickled
        self.path = path
        self.part = part
        self.reason = reason

    def __str__(self) -> str:
        return f"--model {self.path}: cannot load {self.part}: {self.reason}"


@contextmanager
def loading(path: str, part: str = "it") -> Iterator[None]:
    """Around a call that reads the model's files at `path`; wrap nothing of ours, whose ValueError is a bug."""
    try:
        yield
    except ModelLoadError:
        raise
    except FILE_ERRORS as e:
        raise ModelLoadError(path, part, first_line(e)) from e


def first_line(error: BaseException) -> str:
    """The line that says what is wrong; transformers goes on with advice (upgrade, install from source).
    A line that ends in ':' only announces the next, which is kept with it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]
