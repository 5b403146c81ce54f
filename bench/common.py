"""Shared pieces of the benchmarks: a model (random-init of a chosen size, or the demo's real SmolLM2),
workloads, adapters."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from server.adapters.materialize import materialize
from server.adapters.random_adapters import random_adapter_file
from server.demo_smollm2 import STYLE_TRAINING
from server.engine.attention import ATTENTION_NAME
from server.models.loader import load_causal_lm
from server.models.tiny import VOCAB_SIZE, build_tiny_model, byte_level_tokenizer, tiny_config
from server.smollm2 import convert_smollm2

MAX_POSITIONS = 4096
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)

PRESETS = {  # tiny_config fields: "tiny" is the test model, "small" a 26M-parameter CPU workload, "1b" for GPUs
    "tiny": {"hidden_size": 128, "num_layers": 4},
    "small": {"hidden_size": 512, "num_layers": 8},
    "1b": {  # Llama-3.2-1B's shape: 1.24B parameters, the 128k-token embedding tied to the output layer
        "hidden_size": 2048,
        "num_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128_256,
        "tie_word_embeddings": True,
    },
}


# Real models by preset name: a builder writing the model directory, and the shape (layers, rank, positions)
# of the adapters served on it. "smollm2" is the default demo's SmolLM2-135M-Instruct, converted from the
# installed wheel as the demo converts it; its adapters have the demo recipe's shape.
REAL_MODELS = {"smollm2": convert_smollm2}
REAL_ADAPTER_SHAPES = {
    "smollm2": (tuple(STYLE_TRAINING["layers"]), STYLE_TRAINING["rank"], STYLE_TRAINING["positions"]),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=[*PRESETS, *REAL_MODELS], default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench-models"))


def dtype_of(args) -> torch.dtype:
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def model_dir(args) -> Path:
    """The preset's model directory, built once into the cache: a random-init Llama of the preset's
    size, or a real model converted by its builder."""
    directory = args.cache / args.preset
    if args.preset in REAL_MODELS:
        if not (directory / "config.json").exists():
            REAL_MODELS[args.preset](directory)
        return directory
    if not (directory / "config.json").exists() or not _built_from_preset(directory, args.preset):
        build_tiny_model("llama", directory, max_positions=MAX_POSITIONS, **PRESETS[args.preset])
    return directory


def _built_from_preset(directory: Path, preset: str) -> bool:
    """Whether a cached model still has its preset's shape (presets change; the cache outlives them)."""
    built = tiny_config("llama", max_positions=MAX_POSITIONS, **PRESETS[preset]).to_dict()
    cached = json.loads((directory / "config.json").read_text())
    return all(cached.get(key) == built[key] for key in SHAPE_FIELDS)


def build_on_device(preset: str, device: str, dtype: torch.dtype, attention: str = ATTENTION_NAME, seed: int = 0):
    """A random-init model of the preset made straight on `device` in `dtype`, never written to disk: a 1B
    model is built in seconds this way, where building it on the CPU and loading it back takes minutes.
    The same seed on the same device gives the same weights."""
    transformers.utils.logging.set_verbosity_error()
    config = tiny_config("llama", max_positions=MAX_POSITIONS, **PRESETS[preset])
    torch.manual_seed(seed)
    with torch.device(device):
        model = load_causal_lm(config, dtype, attention)
    return model.eval().requires_grad_(False)


def save_preset_model(preset: str, directory: Path, device: str, dtype: torch.dtype) -> Path:
    """The preset and the byte-level tokenizer written for a server process, the model built on `device`."""
    build_on_device(preset, device, dtype, attention="sdpa").save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def load(args, attention: str = ATTENTION_NAME):
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_causal_lm(model_dir(args), dtype_of(args), attention)
    return model.to(args.device).eval().requires_grad_(False)


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_new_tokens: int
    adapter: int | None  # index into the adapter list, None = base model
    arrival: float  # seconds after the start


def workload(
    count: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    num_adapters: int,
    rate: float | None = None,
    base_share: float = 0.0,
    seed: int = 0,
    vocab_size: int = VOCAB_SIZE,
) -> list[Request]:
    """Uniform prompt/output lengths, random token ids below `vocab_size`, adapters round-robin (a share on
    the base model), Poisson arrivals at `rate` requests/s (None: all at once)."""
    rng = random.Random(seed)
    clock = 0.0
    requests = []
    for i in range(count):
        if rate:
            clock += rng.expovariate(rate)
        prompt = [1] + [rng.randrange(3, vocab_size) for _ in range(rng.randint(*prompt_range) - 1)]
        adapter = None if num_adapters == 0 or rng.random() < base_share else i % num_adapters
        requests.append(Request(prompt, rng.randint(*output_range), adapter, clock))
    return requests


def left_padded(batch: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of a batch, left-padded with id 0 as decoder-only generation needs."""
    width = max(len(r.prompt) for r in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, r in enumerate(batch):
        input_ids[row, width - len(r.prompt) :] = torch.tensor(r.prompt)
        attention_mask[row, width - len(r.prompt) :] = 1
    return input_ids, attention_mask


def adapter_shape(args, model) -> tuple[tuple[int, ...], int, str]:
    """(layers, rank, positions) of the adapters a benchmark serves: a real model's own (its demo
    adapters'), else every other layer, rank 4, f7+l7."""
    if args.preset in REAL_ADAPTER_SHAPES:
        return REAL_ADAPTER_SHAPES[args.preset]
    return tuple(range(0, model.config.num_hidden_layers, 2)), 4, "f7+l7"


def make_adapters(model, count: int, rank: int = 4, layers: tuple[int, ...] | None = None, positions: str = "f7+l7"):
    hidden = model.config.hidden_size
    num_layers = model.config.num_hidden_layers
    layers = layers or tuple(range(0, num_layers, 2))
    parameter = next(model.parameters())
    return [
        materialize(
            random_adapter_file("loreft", layers, rank, positions, hidden, seed=i, scale=0.05),
            name=f"a{i}",
            version=1,
            dtype=parameter.dtype,
            device=parameter.device,
        )
        for i in range(count)
    ]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cpus} CPUs, torch {torch.__version__} on {torch.get_num_threads()} thread(s)"


def stamp() -> str:
    return time.strftime("%Y-%m-%d")
