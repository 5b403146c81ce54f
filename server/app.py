"""create_app(): the FastAPI application. Its lifespan loads the model, starts the engine (a thread, or
a process of its own) and the store sync, and on shutdown drains running requests for the configured
grace period."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch
from fastapi import FastAPI
from transformers import AutoTokenizer

from server.adapters.registry import AdapterRegistry
from server.adapters.stores import open_store
from server.api import admin, generate, health, openai, profile, tokenize
from server.api.admin import ADMIN_PREFIX
from server.api.admin_gate import AdminGate
from server.api.body_limit import MULTIPART_OVERHEAD, BodyLimit
from server.api.deps import AppState
from server.api.errors import install_error_handlers
from server.api.profile import PROFILE_PREFIX
from server.api.request_context import RequestContext
from server.config import Settings
from server.distributed.adapter_mirror import AdapterSender
from server.distributed.group import TensorParallelGroup
from server.distributed.launch import rank_device
from server.distributed.runner import TensorParallelDriver
from server.engine.async_engine import AsyncEngine
from server.engine.core import EngineCore, serving_core
from server.engine.core_loop import CoreHost, CoreThread
from server.engine.grammar import Grammars, grammars_for
from server.engine.model_runner import ModelRunner
from server.engine_process import CoreProcess
from server.gc_freeze import freeze_long_lived, thaw
from server.metrics import Metrics
from server.model_facts import ModelFacts
from server.model_load_errors import loading
from server.models.loader import load_model, resolve_device, resolve_dtype
from server.plugins import load_plugins

log = logging.getLogger(__name__)

DESCRIPTION = """One frozen base model, many ReFT adapters per request in mixed batches.

* `/v1/generate`: native generation (JSON or server-sent events).
* `/v1/completions`, `/v1/chat/completions`, `/v1/models`: OpenAI-compatible; `model` picks the adapter.
* `/tokenize`, `/detokenize`: vLLM's; the token ids a prompt or a chat is served as, and text back from ids.
* `/v1/adapters`: the admin API (bearer token).
* `/health`, `/ready`, `/metrics`: operations.
"""


def served_name(settings: Settings, model_path: str) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    return Path(model_path).name if Path(model_path).exists() else model_path


def build_state(
    settings: Settings,
    model_path: str,
    model=None,
    tokenizer=None,
    group: TensorParallelGroup | None = None,
    store=None,
) -> AppState:
    """Everything the routes need; the engine's host loads the model unless one is given (tests pass
    theirs), and the store is opened unless it was. With a tensor-parallel group, this process is its
    rank 0 and the followers load their shards meanwhile."""
    if engine_core_in_process(settings, model_given=model is not None):
        settings.apply_torch_threads(resolve_device(settings.device).type)  # this process serves the API alone
        host = CoreProcess(settings, model_path)
        try:  # the registry's adapter copies stay on the CPU; the engine process holds its own
            with loading(model_path, "its tokenizer"):
                tokenizer = AutoTokenizer.from_pretrained(model_path)
            # requests' grammars are checked here against a reader of their own: the engine's is in its process
            eos = {tokenizer.eos_token_id} - {None}
            grammars = grammars_for(tokenizer, host.model.vocab_size, eos)
            cpu = torch.device("cpu")
            return _state_around(settings, model_path, host, host.model, tokenizer, grammars, cpu, store)
        except BaseException:  # the engine process, and its model's memory, must not outlive a failed start
            host.abandon()
            raise
    core, tokenizer = _thread_core(settings, model_path, model, tokenizer, group)
    settings.apply_torch_threads(next(core.runner.model.parameters()).device.type)  # once it is loaded
    adapter_device = next(core.runner.model.parameters()).device
    facts = ModelFacts.of(core.runner.model)
    return _state_around(settings, model_path, CoreThread(core), facts, tokenizer, core.grammars, adapter_device, store)


def _state_around(
    settings: Settings,
    model_path: str,
    host: CoreHost,
    facts: ModelFacts,
    tokenizer,
    grammars: Grammars | None,
    adapter_device: torch.device,
    store=None,
) -> AppState:
    """The routes' state around an engine host that holds the model."""
    model_name = served_name(settings, model_path)
    metrics = Metrics(
        max_lora=settings.max_resident_adapters,
        model_name=model_name,
        vllm_compatible=settings.vllm_compatible_metrics,
    )
    engine = AsyncEngine(host, tokenizer, max_queue=settings.max_queue, metrics=metrics)
    if store is None:
        store = open_store(settings.store)
    registry = AdapterRegistry(
        store,
        facts.shape(settings.adapter_max_abs),
        dtype=facts.dtype,
        device=adapter_device,
        max_bytes=int(settings.adapter_memory),
        max_count=settings.max_resident_adapters,
        sync_interval=settings.store_sync_interval,
        metrics=metrics,
        fingerprint=facts.fingerprint,
        allow_foreign=settings.allow_foreign_adapters,
    )
    metrics.watch_residents(
        lambda: [(r.name, r.version) for r in registry.resident_report()], settings.max_resident_adapters
    )
    metrics.watch_loading(registry.loading_names)
    return AppState(settings, model_name, facts, tokenizer, engine, store, registry, metrics, grammars)


def engine_core_in_process(settings: Settings, model_given: bool) -> bool:
    """Whether the engine core gets a process of its own (settings.engine_core; auto: on one GPU)."""
    shared = model_given or settings.tensor_parallel > 1  # a loaded model or a group lives in this process
    if settings.engine_core == "process":
        if shared:
            raise ValueError(
                "--engine-core process loads the model in its own process: not with tensor parallelism, nor "
                "with a model already loaded here"
            )
        return True
    return settings.engine_core == "auto" and not shared and resolve_device(settings.device).type == "cuda"


def _thread_core(
    settings: Settings, model_path: str, model, tokenizer, group: TensorParallelGroup | None
) -> tuple[EngineCore, object]:
    """The core for a thread of this process, and the tokenizer: the model's, unless one is given."""
    make_runner = ModelRunner
    if group is not None:
        group.send_at_start(model_path)
        sender = AdapterSender(int(settings.adapter_memory), settings.max_resident_adapters)
        make_runner = partial(TensorParallelDriver, group=group, adapters=sender)
    if model is None:
        device = rank_device(settings, 0) if group is not None else resolve_device(settings.device)
        model, tokenizer = load_model(
            model_path, device, resolve_dtype(settings.dtype, device), tensor_parallel=settings.tensor_parallel
        )
    config = settings.engine_config(next(model.parameters()).device.type)
    return serving_core(model, config, tokenizer, make_runner), tokenizer


def create_app(
    settings: Settings,
    *,
    model_path: str | None = None,
    model=None,
    tokenizer=None,
    group: TensorParallelGroup | None = None,
    store=None,
) -> FastAPI:
    """The app for `settings`. `model_path` defaults to settings.model; tests may pass a loaded model.
    `group`: the tensor-parallel group this process leads as rank 0; stopped with the app. `store`: the
    adapter store, already opened (the CLI opens it before anything loads); default: settings.store."""
    path = model_path or settings.model
    if path is None:
        raise ValueError("no model given: pass --model (the CLI builds the demo model when none is given)")
    load_plugins(settings.plugins)  # before the registry reads any adapter of a type a plugin brings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            state = await asyncio.to_thread(build_state, settings, path, model, tokenizer, group, store)
        except Exception:  # not on cancellation: build_state would still be using the group in its thread
            if group is not None:  # its followers, and their shards' memory, must not outlive a failed start
                await asyncio.to_thread(group.abandon)
            raise
        app.state.reft = state
        try:  # whatever fails from here on, the engine (a process, perhaps) is stopped again
            state.engine.start()
            await state.registry.start()
            freeze_long_lived("server")
            log.info("ready", extra={"fields": {"model": state.model_name, "max_model_len": state.max_model_len}})
            yield
        finally:
            state.begin_draining()
            await state.registry.stop()
            await state.engine.stop(grace_seconds=state.grace_left())
            if group is not None:
                await asyncio.to_thread(group.stop)
            thaw()
            log.info("stopped")

    app = FastAPI(title="reft-server", version=version("reft-server"), description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    # outermost last: the request id first, then the admin token, then the body's size
    upload_limit = int(settings.max_upload_size) + MULTIPART_OVERHEAD
    app.add_middleware(
        BodyLimit, default_limit=int(settings.max_request_body), limits_by_prefix={ADMIN_PREFIX: upload_limit}
    )
    app.add_middleware(AdminGate, settings=settings, path_prefixes=(ADMIN_PREFIX, PROFILE_PREFIX))
    app.add_middleware(RequestContext)
    for module in (generate, openai, tokenize, admin, health, profile):
        app.include_router(module.router)
    return app
