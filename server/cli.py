"""reft-server command line: serve, adapters (store management), train."""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import torch
import uvicorn
from pydantic import SecretStr, ValidationError

from server.config import Settings
from server.training.cli import add_train_arguments, run_train

ENV_PREFIX = "REFT_"
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


def serve(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from server.app import create_app
    from server.distributed.launch import follow_under_torchrun, join_torchrun_group, spawn_group
    from server.logging_setup import setup_logging
    from server.model_loader import check_tensor_parallel

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_json)
    if settings.threads:  # before the demo build too: oversubscribed cores slow training down badly
        torch.set_num_threads(settings.threads)
    group = join_torchrun_group(settings)
    if group is not None and group.rank > 0:  # a follower: rank 0 sends it the model and every step
        follow_under_torchrun(group, settings)
        return 0
    model_path, banner = settings.model, REAL_MODEL_BANNER
    if model_path is None:
        from server.demo import DEMO_BANNER, DEMO_MODEL_NAME, prepare_demo

        model_path = str(prepare_demo(settings.demo_dir, settings.store, log=_say))
        banner = DEMO_BANNER
        settings = settings.model_copy(update={"served_model_name": settings.served_model_name or DEMO_MODEL_NAME})
        if settings.admin_token is None and not settings.admin_open:
            # the demo tour uploads adapters: a fresh token, printed once, rather than an open admin API
            settings = settings.model_copy(update={"admin_token": SecretStr(secrets.token_urlsafe(16))})
    token = settings.admin_token.get_secret_value() if settings.admin_token else "<REFT_ADMIN_TOKEN>"
    if settings.tensor_parallel > 1 and group is None:
        check_tensor_parallel(AutoConfig.from_pretrained(model_path), settings.tensor_parallel)  # before spawning
        group = spawn_group(settings)
    app = create_app(settings, model_path=model_path, group=group)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
    )

    def show_banner(port: int) -> None:
        url = f"http://{settings.host}:{port}"
        _say(banner.format(url=url, model=app.state.reft.model_name, token=token))

    for sig in (signal.SIGINT, signal.SIGTERM):
        # uvicorn re-raises the signal after its graceful shutdown; a drained server exits 0
        signal.signal(sig, lambda *_: None)
    DrainingServer(config, show_banner).run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's Server that marks the app as draining (so /ready answers 503 and new requests are
    refused) as soon as SIGTERM lands, and prints a banner once it listens."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[int], None]):
        super().__init__(config)
        self.on_listening = on_listening

    def handle_exit(self, sig, frame) -> None:
        state = getattr(self.config.app.state, "reft", None)
        if state is not None:
            state.begin_draining()
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            ports = [sock.getsockname()[1] for server in self.servers for sock in server.sockets]
            self.on_listening(ports[0] if ports else self.config.port)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- adapters ----------------------------------------------------------------------------------------
def adapters_command(args: argparse.Namespace) -> int:
    from server.adapters.format import AdapterError, read_config
    from server.adapters.pyreft import import_pyreft
    from server.adapters.store import AdapterStore, InvalidName, NotFound

    store = AdapterStore(args.store)
    try:
        if args.action == "import-pyreft":
            layers = [int(x) for x in args.layers.replace(";", ",").split(",")] if args.layers else None
            adapter = import_pyreft(
                args.directory,
                positions=args.positions,
                share_weights=args.share_weights,
                activation=args.activation,
                intervention_type=args.type,
                layers=layers,
                rank=args.rank,
                base_model=args.base_model or "",
            )
            version = store.publish(args.name, adapter.to_bytes())
            print(json.dumps({"name": args.name, "version": version, **json.loads(adapter.config.to_json())}))
        elif args.action == "list":
            for name in store.names():
                info = store.info(name)
                config = read_config(info.version(info.current).path)
                print(
                    f"{name}\tv{info.current}\t{len(info.versions)} version(s)\t{config.type}\trank {config.rank}"
                    f"\tlayers {list(config.layers)}\t{config.positions}"
                )
        elif args.action == "show":
            info = store.info(args.name)
            versions = []
            for v in info.versions:
                versions.append(
                    {
                        "version": v.version,
                        "size": v.size,
                        "created": v.created,
                        "config": json.loads(read_config(v.path).to_json()),
                    }
                )
            print(json.dumps({"name": info.name, "current_version": info.current, "versions": versions}, indent=2))
        elif args.action == "delete":
            store.delete(args.name)
            print(f"deleted {args.name}")
        elif args.action == "set-current":
            store.set_current(args.name, args.version)
            print(f"{args.name} now serves version {args.version}")
    except (AdapterError, InvalidName, NotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_adapters_parser(subparsers) -> None:
    parser = subparsers.add_parser("adapters", help="manage an adapter store directory")
    parser.add_argument("--store", default="adapters_store", type=Path, help="store directory (default adapters_store)")
    actions = parser.add_subparsers(dest="action", required=True)
    imp = actions.add_parser("import-pyreft", help="import a pyreft/pyvene checkpoint directory")
    imp.add_argument("directory", type=Path)
    imp.add_argument("--name", required=True)
    imp.add_argument("--positions", required=True, help="positions it was trained with, e.g. f7+l7")
    imp.add_argument("--share-weights", action="store_true", help="prefix and suffix share one intervention")
    imp.add_argument("--activation", default="linear")
    imp.add_argument("--type", default=None, help="intervention type (only without config.json)")
    imp.add_argument("--layers", default=None, help="e.g. 8;16 (only without config.json)")
    imp.add_argument("--rank", type=int, default=None, help="(only without config.json)")
    imp.add_argument("--base-model", default=None, help="recorded in the adapter's metadata")
    actions.add_parser("list", help="list adapters")
    show = actions.add_parser("show", help="show one adapter's versions")
    show.add_argument("name")
    delete = actions.add_parser("delete", help="delete an adapter")
    delete.add_argument("name")
    current = actions.add_parser("set-current", help="serve another version (roll back)")
    current.add_argument("name")
    current.add_argument("version", type=int)
    parser.set_defaults(handler=adapters_command)


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
        for error in e.errors():
            print(f"error: --{'-'.join(map(str, error['loc']))}: {error['msg']}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
