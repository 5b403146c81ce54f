"""reft-server command line: serve, adapters (store management), train."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import signal
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import torch
import uvicorn
from pydantic import ByteSize, SecretStr, TypeAdapter, ValidationError

from server.adapters.precondition_args import add_precondition_arguments
from server.adapters.store import StoreError
from server.adapters.stores import open_store
from server.config import ENGINE_CONFIG_SOURCES, Settings
from server.engine.config import EngineConfigError
from server.gc_freeze import exit_without_teardown
from server.model_load_errors import ModelLoadError, loading
from server.model_location import ModelNotFound, check_tokenizer, model_argument, model_location
from server.plugins import PluginError
from server.start_checks import (
    StartUpMistake,
    check_address,
    check_device,
    check_engine_core,
    check_model_shards,
)
from server.training.cli import add_train_arguments, run_train

ENV_PREFIX = "REFT_"
STREAM_FLUSH_SECONDS = 2.0  # after the shutdown grace: for aborted streams to send their last events
TRAIN_HELP = (
    "Fit an adapter on JSONL data ({prompt, completion} or {messages} lines) with the base model frozen, "
    "applying interventions exactly as the server does; write it to a file or publish it to a store."
)


# -- serve -------------------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags fall back to REFT_* variables, then defaults."""
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None else default
        help_text = f"{field.description} [env {ENV_PREFIX}{name.upper()}; default {shown}]"
        if _is_bool(field.annotation):
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=None, metavar=name.upper(), help=help_text)


def _is_bool(annotation) -> bool:
    if annotation is bool:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return bool in typing.get_args(annotation)
    return False


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)


REAL_MODEL_BANNER = "reft-server serving {model} on {url}  (OpenAPI docs: {url}/docs)"
DEMO_FOOTER = """
  Admin API (uploads, deletes): {admin}
  To serve a real model: reft-server serve --model <local path or hub id>   (see the README)
"""


def serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.distributed.launch import follow_under_torchrun, join_torchrun_group, spawn_group
    from server.logging_setup import setup_logging

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_json)
    if settings.threads:  # before the demo build too: oversubscribed cores slow training down badly
        torch.set_num_threads(settings.threads)
    check_device(settings)  # on every rank, before torchrun's group binds each rank to its GPU
    check_engine_core(settings)
    group = join_torchrun_group(settings)
    if group is not None and group.rank > 0:  # a follower: rank 0 sends it the model and every step
        follow_under_torchrun(group, settings)
        exit_without_teardown(0)
    # the store, the address, the model's directory and its fit to the group are checked before anything
    # loads: a mistake in any is one line (main() says a StoreError's or a StartUpMistake's), not a
    # traceback from the app's start; so are model files that cannot be loaded (a ModelLoadError)
    store = open_store(settings.store)
    check_address(settings.host, settings.port)
    model_path, banner, admin = settings.model, REAL_MODEL_BANNER, ""
    if model_path is not None:
        try:
            model_path = model_location(model_path)
            check_tokenizer(model_path)
        except ModelNotFound as e:
            _say(f"error: --model: {e}")
            return 2
    else:
        from server.demo import prepare_demo
        from server.smollm2 import SmolLM2Missing

        try:
            prepared = prepare_demo(settings.demo, settings.demo_dir, settings.store, log=_say)
        except SmolLM2Missing as e:
            _say(f"error: {e}")
            return 2
        except OSError as e:  # an unwritable --demo-dir, a full disk
            _say(f"error: cannot prepare the {settings.demo} demo: {e}")
            return 2
        model_path, banner = str(prepared.model_dir), prepared.demo.banner + DEMO_FOOTER
        settings = settings.model_copy(
            update={"served_model_name": settings.served_model_name or prepared.demo.model_name}
        )
        settings, admin = demo_admin_access(settings)
    if settings.tensor_parallel > 1:
        check_model_shards(model_path, settings.tensor_parallel)  # before spawning; under torchrun, before loading
        if group is None:
            group = spawn_group(settings)
    app = create_app(settings, model_path=model_path, group=group, store=store)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        lifespan="off",  # DrainingServer runs the app's lifespan itself
        # past the grace, the requests still running are aborted (DrainingServer): a little longer, so
        # that their streams still send their last event and [DONE] before uvicorn cuts the connections
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace + STREAM_FLUSH_SECONDS),
    )

    def show_banner(port: int) -> None:
        url = f"http://{settings.host}:{port}"
        _say(banner.format(url=url, model=app.state.reft.model_name, admin=admin))

    for sig in (signal.SIGINT, signal.SIGTERM):
        # uvicorn re-raises the signal after its graceful shutdown; a drained server exits 0
        signal.signal(sig, lambda *_: None)
    DrainingServer(config, show_banner).run()
    exit_without_teardown(0)  # the app has stopped its engine and its group: nothing is left to free


def demo_admin_access(settings: Settings) -> tuple[Settings, str]:
    """The demo tour uploads adapters: without a token or --admin-open, a fresh token for this run.
    Returns the settings and how the banner describes access; it shows only a token generated here."""
    if settings.admin_token is not None:
        return settings, "Bearer token = the REFT_ADMIN_TOKEN (--admin-token) you set"
    if settings.admin_open:
        return settings, "open, no token (--admin-open)"
    token = secrets.token_urlsafe(16)
    return settings.model_copy(update={"admin_token": SecretStr(token)}), f"Bearer token for this run: {token}"


class DrainingServer(uvicorn.Server):
    """uvicorn's Server that marks the app as draining (so /ready answers 503 and new requests are
    refused) as soon as SIGTERM lands, aborts what still runs when the grace period ends (so that every
    stream ends with an event and [DONE] rather than a cut connection), and prints a banner once it
    listens. It runs the app's lifespan as an `AppLifespan`: a start that fails raises out of run()."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[int], None]):
        super().__init__(config)
        self.on_listening = on_listening
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig, frame) -> None:
        state = getattr(self.config.app.state, "reft", None)
        if state is not None and state.draining_since is None:
            state.begin_draining()
            if self._loop is not None:  # a signal handler: the loop is told through its self-pipe
                self._loop.call_soon_threadsafe(self._abort_after_grace, state)
        super().handle_exit(sig, frame)

    def _abort_after_grace(self, state) -> None:
        asyncio.get_running_loop().call_later(state.grace_left(), state.engine.cancel_all)

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self.lifespan = AppLifespan(self.config.app)  # in place of uvicorn's, which the config turns off
        await super().startup(sockets)
        if self.started:
            ports = [sock.getsockname()[1] for server in self.servers for sock in server.sockets]
            self.on_listening(ports[0] if ports else self.config.port)


class AppLifespan:
    """The app's lifespan behind the interface uvicorn's Server drives (startup, shutdown, should_exit,
    state), entered and left in the server's task. uvicorn's own logs what a failed start raises, with its
    traceback, and exits 3; here it propagates, so that main() says a mistake in the settings that only
    the loaded model shows (an EngineConfigError) in one line, and a bug keeps its traceback."""

    should_exit = False  # uvicorn's sets it after a failed start; this one raises instead

    def __init__(self, app):
        self.state: dict = {}  # what each request's scope["state"] starts from: the app keeps its own
        self._context = app.router.lifespan_context(app)

    async def startup(self) -> None:
        await self._context.__aenter__()

    async def shutdown(self) -> None:
        await self._context.__aexit__(None, None, None)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- adapters ----------------------------------------------------------------------------------------
def adapters_command(args: argparse.Namespace) -> int:
    from server.adapters.diff import diff_adapters
    from server.adapters.errors import AdapterError
    from server.adapters.format import AdapterFile
    from server.adapters.hub import HubError
    from server.adapters.options import AdapterOptions
    from server.adapters.precondition_args import PRECONDITION_EXIT_CODE, precondition_from_args
    from server.adapters.pyreft import import_pyreft
    from server.adapters.store import NotFound, PreconditionFailed
    from server.adapters.stores import open_store

    try:
        store = open_store(args.store)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    condition = precondition_from_args(args) if hasattr(args, "if_version") else None
    try:
        if args.action == "import-pyreft":
            options = AdapterOptions.from_args(args)
            adapter = import_pyreft(args.directory, **options.fields(), base_model=args.base_model or "")
            if args.model is not None:
                adapter = _with_base_model(adapter, args.model)
            version = store.publish(args.name, adapter.to_bytes(), precondition=condition)
            print(json.dumps({"name": args.name, "version": version, **json.loads(adapter.config.to_json())}))
        elif args.action == "pull":
            adapter = _pull(args)
            version = store.publish(args.name, adapter.to_bytes(), precondition=condition)
            print(json.dumps({"name": args.name, "version": version, **json.loads(adapter.config.to_json())}))
        elif args.action == "list":
            return _list(store)
        elif args.action == "show":
            info = store.info(args.name)
            versions = []
            for v in info.versions:
                versions.append(
                    {
                        "version": v.version,
                        "size": v.size,
                        "created": v.created,
                        "config": json.loads(store.read_config(info.name, v.version).to_json()),
                    }
                )
            print(json.dumps({"name": info.name, "current_version": info.current, "versions": versions}, indent=2))
        elif args.action == "diff":
            (first, a), (second, b) = _version_ref(args.first), _version_ref(args.second)
            old = AdapterFile.from_bytes(store.read(first, a)[1], ignore_unknown=True)
            new = AdapterFile.from_bytes(store.read(second, b)[1], ignore_unknown=True)
            print(json.dumps({"first": args.first, "second": args.second, **diff_adapters(old, new)}, indent=2))
        elif args.action == "delete":
            store.delete(args.name, condition)
            print(f"deleted {args.name}")
        elif args.action == "set-current":
            store.set_current(args.name, args.version, condition)
            print(f"{args.name} now serves version {args.version}")
    except PreconditionFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return PRECONDITION_EXIT_CODE
    except (AdapterError, HubError, StoreError, NotFound, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _list(store) -> int:
    """One line per adapter; one that cannot be read is named on stderr (exit 2), never hides the rest."""
    from server.adapters.errors import AdapterError
    from server.adapters.store import NotFound

    unreadable = 0
    for name in store.names():
        try:
            info = store.info(name)
            config = store.read_config(name, info.current)
        except NotFound:
            continue  # deleted meanwhile
        except (AdapterError, ValueError, OSError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            unreadable += 1
            continue
        print(
            f"{name}\tv{info.current}\t{len(info.versions)} version(s)\t{config.type}\trank {config.rank}"
            f"\tlayers {list(config.layers)}\t{config.positions}"
        )
    return 2 if unreadable else 0


def _pull(args: argparse.Namespace):
    from server.adapters.hub import HubRef, pull
    from server.adapters.options import AdapterOptions

    options = AdapterOptions.from_args(args)
    adapter = pull(HubRef.parse(args.repo), options, args.max_upload_size, base_model=args.base_model or "")
    return _with_base_model(adapter, args.model) if args.model is not None else adapter


def _version_ref(ref: str) -> tuple[str, int]:
    from server.adapters.registry import parse_ref

    name, version = parse_ref(ref)
    if version is None:
        raise ValueError(f"{ref!r}: give a version, as in {ref}@1")
    return name, version


def _with_base_model(adapter, model_path: str):
    """The adapter checked against the model it was trained on, with that model's fingerprint."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from server.adapters.fingerprint import model_fingerprint
    from server.adapters.model_shape import ModelShape
    from server.adapters.validation import validate

    with loading(model_path):  # bf16: half the memory, the same fingerprint
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    validate(adapter, ModelShape.of(model))
    config = dataclasses.replace(adapter.config, base_model_fingerprint=model_fingerprint(model))
    if not config.base_model:
        config = dataclasses.replace(config, base_model=model_path)
    adapter.config = config
    return adapter


def add_adapters_parser(subparsers) -> None:
    parser = subparsers.add_parser("adapters", help="manage an adapter store directory")
    store_help = "store directory or s3://bucket/prefix (default adapters_store)"
    parser.add_argument("--store", default="adapters_store", help=store_help)
    # users type --store after the action too; SUPPRESS keeps the action's parser from resetting the value
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--store", default=argparse.SUPPRESS, help=store_help)
    actions = parser.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=help_text, parents=[after])

    imp = action("import-pyreft", "import a pyreft/pyvene checkpoint directory")
    imp.add_argument("directory", type=Path)
    _add_import_arguments(imp, positions_required=True)
    pull = action("pull", "import from the Hugging Face Hub: a pyreft checkpoint or a .safetensors adapter")
    pull.add_argument("repo", help="REPO_ID or REPO_ID@REVISION (token from HF_TOKEN)")
    _add_import_arguments(pull, positions_required=False)
    upload_limit = Settings.model_fields["max_upload_size"].default
    pull.add_argument(
        "--max-upload-size",
        type=_byte_size,
        metavar="SIZE",
        default=os.environ.get(f"{ENV_PREFIX}MAX_UPLOAD_SIZE", str(upload_limit)),
        help="the files it fetches come to this at most, as for the server's uploads, e.g. 1GiB "
        f"[env {ENV_PREFIX}MAX_UPLOAD_SIZE; default {upload_limit.human_readable()}]",
    )
    action("list", "list adapters")
    show = action("show", "show one adapter's versions")
    show.add_argument("name")
    diff = action("diff", "compare two versions: config, provenance, relative parameter change")
    diff.add_argument("first", help="NAME@VERSION")
    diff.add_argument("second", help="NAME@VERSION")
    delete = action("delete", "delete an adapter")
    delete.add_argument("name")
    add_precondition_arguments(delete, creates=False)
    current = action("set-current", "serve another version (roll back)")
    current.add_argument("name")
    current.add_argument("version", type=int)
    add_precondition_arguments(current, creates=False)
    parser.set_defaults(handler=adapters_command)


def _add_import_arguments(parser: argparse.ArgumentParser, positions_required: bool) -> None:
    parser.add_argument("--name", required=True)
    where = "" if positions_required else " (pyreft checkpoints only)"
    parser.add_argument(
        "--positions", required=positions_required, help=f"positions it was trained with, e.g. f7+l7{where}"
    )
    parser.add_argument("--share-weights", action="store_true", help="prefix and suffix share one intervention")
    parser.add_argument("--activation", default="linear")
    parser.add_argument(
        "--type", dest="intervention_type", default=None, help="intervention type (only without config.json)"
    )
    parser.add_argument("--layers", default=None, help="e.g. 8;16 (only without config.json)")
    parser.add_argument("--rank", type=int, default=None, help="(only without config.json)")
    parser.add_argument("--base-model", default=None, help="recorded in the adapter's metadata")
    parser.add_argument(
        "--model",
        type=model_argument,
        default=None,
        help="the base model directory it was trained on: checks the shapes and records its fingerprint",
    )
    add_precondition_arguments(parser, creates=True)


def _byte_size(text: str) -> int:
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size, e.g. 256MiB") from None


# -- entry point -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reft-server", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    serve_parser = subparsers.add_parser(
        "serve",
        help="serve a model (without --model: the offline demo)",
        description="Serve a base model and the adapters of a store. Every flag is also an environment variable.",
    )
    add_settings_arguments(serve_parser)
    serve_parser.set_defaults(handler=serve)
    add_adapters_parser(subparsers)
    train_parser = subparsers.add_parser(
        "train", help="train a ReFT adapter on the model you serve", description=TRAIN_HELP
    )
    add_train_arguments(train_parser)
    train_parser.set_defaults(handler=run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as e:
        for error in e.errors():  # loc[1:] names the union member tried, not something the user typed
            print(f"error: {_flag(str(error['loc'][0]))}: {error['msg']}", file=sys.stderr)
        return 2
    except EngineConfigError as e:  # found once the model loaded, while the engine was built from the settings
        flags = "/".join(_flag(ENGINE_CONFIG_SOURCES.get(field, field)) for field in e.fields)
        print(f"error: {flags}: {e.reason}", file=sys.stderr)
        return 2
    except (PluginError, StoreError, StartUpMistake, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a store write is atomic: an interrupted one changed nothing
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
