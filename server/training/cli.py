"""`reft-server train`: fit an adapter on the model you serve, write it to a file or the store.

`add_train_arguments` declares the flags on a parser (server/cli.py wires it as a subcommand) and
`run_train` runs it, returning the exit status. Progress goes to stderr, the summary to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from server.adapters.dtypes import DTYPES
from server.adapters.model_shape import ModelShape
from server.adapters.options import LAYERS_HELP, AdapterOptions
from server.adapters.precondition_args import (
    PRECONDITION_EXIT_CODE,
    add_precondition_arguments,
    precondition_from_args,
)
from server.adapters.store import Precondition, PreconditionFailed, StoreError, check_name
from server.adapters.stores import open_store
from server.model_load_errors import loading
from server.model_location import model_with_tokenizer_argument
from server.plugins import PluginError, load_plugins, split_plugins
from server.reft.interventions import INTERVENTION_TYPES, intervention_type
from server.training.data import load_examples
from server.training.provenance import file_sha256, training_provenance
from server.training.trainer import Progress, TrainResult, train_adapter


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, type=model_with_tokenizer_argument, help="base model directory (the model you serve)"
    )
    parser.add_argument(
        "--data", required=True, type=Path, help='JSONL: {"prompt", "completion"} or {"messages"} lines'
    )
    parser.add_argument("--name", required=True, help="adapter name")
    parser.add_argument("--layers", required=True, help=f"layers to intervene on: {LAYERS_HELP}")
    parser.add_argument("--rank", type=int, default=4, help="low-rank dimension r (default 4)")
    parser.add_argument(
        "--positions", default="f1+l1", help='prompt positions: "f1+l1", "f5", "l3", "0,1,-1" (default f1+l1)'
    )
    parser.add_argument(
        "--share-weights",
        action="store_true",
        help="one intervention per layer for both sides (implied for one-sided positions)",
    )
    parser.add_argument(
        "--type",
        dest="intervention_type",
        default="loreft",
        help=f"intervention type: {', '.join(INTERVENTION_TYPES)}, or one a --plugins module registers",
    )
    parser.add_argument(
        "--plugins", type=split_plugins, default=[], help="modules to import first, comma-separated (new types)"
    )
    parser.add_argument("--activation", default="linear", help="activation of the learned source (default linear)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--lr", type=float, default=4e-3, help="AdamW learning rate, decayed linearly to 0 (default 4e-3)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--weight-decay", type=float, default=0.0, help="for the linear parameters; the rotation never decays"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype the base model runs in")
    parser.add_argument("--device", default="cpu", help='torch device, e.g. "cpu" or "cuda"')
    destination = parser.add_mutually_exclusive_group(required=True)
    destination.add_argument("--out", type=Path, help="write the adapter to this .safetensors file")
    destination.add_argument(
        "--store", help="publish the adapter as a new version in this adapter store (directory or s3://bucket/prefix)"
    )
    add_precondition_arguments(parser, creates=True)


def run_train(args: argparse.Namespace) -> int:
    try:
        result, destination = _train(args)
    except PreconditionFailed as e:
        print(f"reft-server train: error: {e}", file=sys.stderr)
        return PRECONDITION_EXIT_CODE
    except (ValueError, OSError, PluginError, StoreError) as e:
        print(f"reft-server train: error: {e}", file=sys.stderr)
        return 1
    print(_summary(args, result, destination))
    return 0


def publish_to_store(store: str, name: str, data: bytes, precondition: Precondition | None = None) -> int:
    """Publish as the next version of `name`; returns the version number."""
    return open_store(store).publish(name, data, precondition=precondition)


def _train(args: argparse.Namespace) -> tuple[TrainResult, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow import, only when training

    load_plugins(args.plugins)
    intervention_type(args.intervention_type)  # an unknown type fails before anything loads
    device = _device(args.device)
    _check_precondition_early(args)  # hours of training must not end in a refused publish that was foreseeable
    with loading(args.model, "its tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    data_sha256 = file_sha256(args.data)  # before parsing: the bytes trained on, even if the file changes later
    examples = load_examples(args.data, tokenizer)  # bad data fails before the model loads
    with loading(args.model):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    model = model.to(device)
    bar = ProgressBar(sys.stderr)
    options = AdapterOptions.from_args(args, ModelShape.of(model).num_layers)
    if options.layers is None:
        raise ValueError(f"--layers names no layer: use {LAYERS_HELP}")
    result = train_adapter(
        model,
        examples,
        **options.fields(),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        seed=args.seed,
        progress=bar,
        base_model=str(args.model),
    )
    bar.close()
    provenance = training_provenance(args, result, len(examples), data_sha256)
    result.adapter.config = dataclasses.replace(result.adapter.config, provenance=provenance)
    return result, _write(result, args)


def _device(name: str) -> torch.device:
    """--device, tried before anything loads: a typo or a missing GPU is an error, not a traceback."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # torch asserts when it was built without CUDA
        raise ValueError(f"--device {name!r}: {e}") from None
    return device


def _check_precondition_early(args: argparse.Namespace) -> None:
    """The store, the name and the precondition, which the publish after training would refuse."""
    if args.store is None:
        return
    check_name(args.name)
    store = open_store(args.store)
    condition = precondition_from_args(args)
    if condition is not None:
        condition.check(args.name, store.current_or_none(args.name))


def _write(result: TrainResult, args: argparse.Namespace) -> str:
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result.adapter.save(args.out)
        return str(args.out)
    version = publish_to_store(args.store, args.name, result.adapter.to_bytes(), precondition_from_args(args))
    return f"{args.store} as {args.name}@{version}"


def _summary(args: argparse.Namespace, result: TrainResult, destination: str) -> str:
    config = result.adapter.config
    return "\n".join(
        [
            f"trained {result.trained_parameters:,} parameters ({config.type}, rank {config.rank}, "
            f"{len(config.layers)} layers, positions {config.positions}) over {len(result.epoch_losses)} epochs "
            f"in {result.seconds:.1f} s",
            f"final loss {result.final_loss:.4f} (first epoch {result.epoch_losses[0]:.4f})",
            f"adapter {args.name!r} written to {destination}",
        ]
    )


class ProgressBar:
    """One line on `stream`, redrawn in place with a carriage return: steps done and the running loss."""

    def __init__(self, stream: TextIO, width: int = 30, min_interval_s: float = 0.1):
        self.stream = stream
        self.width = width
        self.min_interval_s = min_interval_s
        self._last_draw = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if progress.step < progress.total_steps and now - self._last_draw < self.min_interval_s:
            return  # redrawing every step would cost more than a tiny model's step
        self._last_draw = now
        filled = self.width * progress.step // progress.total_steps
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] step {progress.step}/{progress.total_steps} "
            f"epoch {progress.epoch}/{progress.epochs} loss {progress.loss:.4f}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
