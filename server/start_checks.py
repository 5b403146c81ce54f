"""`reft-server serve`'s checks of its settings against this machine and the model, made before anything
loads: a mistake found here is one line and exit status 2 (main() says it), not a traceback from the
app's start or from a spawned rank, nor a failure after minutes of loading."""

from __future__ import annotations

import socket

import torch

from server.config import Settings


class StartUpMistake(ValueError):
    """A setting this machine or this model cannot be served with; the message names its flag."""


def check_device(settings: Settings) -> None:
    """The device is here, with a GPU for every rank of a tensor-parallel group (rank r uses GPU r), and
    such a group on GPUs is told the KV cache's size."""
    from server.models.loader import resolve_device  # transformers: slow to import, for serve alone

    try:
        device = resolve_device(settings.device)
    except ValueError as e:
        raise StartUpMistake(f"--device {settings.device}: {e}") from None
    size = settings.tensor_parallel
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise StartUpMistake(f"--tensor-parallel {size}: a GPU per rank, and torch sees {torch.cuda.device_count()}")
    if device.type == "cuda" and size > 1 and settings.kv_cache_memory == "auto":  # as EngineCore would refuse
        raise StartUpMistake(
            f"--tensor-parallel {size}: give the KV cache's size (--kv-cache-memory): sizing it from the GPU's "
            "memory would take a warm-up step of the whole group"
        )


def check_engine_core(settings: Settings) -> None:
    """--engine-core process loads the model in a process of its own, apart from a tensor-parallel group."""
    if settings.engine_core == "process" and settings.tensor_parallel > 1:
        raise StartUpMistake(
            f"--engine-core process: not with --tensor-parallel {settings.tensor_parallel}, whose rank 0 steps "
            "in the server's process (use thread or auto)"
        )


def check_address(host: str, port: int) -> None:
    """The address is free to listen on: uvicorn binds it only once the model has loaded."""
    try:
        for family, kind, protocol, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            with socket.socket(family, kind, protocol) as probe:
                # as asyncio's server binds: a port left in TIME_WAIT is free, and IPv6 leaves IPv4 alone
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as e:
        raise StartUpMistake(f"--host/--port {host}:{port}: {e.strerror or e}") from None


def check_model_shards(model_path: str, size: int) -> None:
    """The model splits into whole attention and KV heads over `size` ranks."""
    from transformers import AutoConfig

    from server.model_load_errors import loading
    from server.models.loader import check_tensor_parallel

    with loading(model_path):
        config = AutoConfig.from_pretrained(model_path)
    try:
        check_tensor_parallel(config, size)
    except ValueError as e:
        raise StartUpMistake(f"--tensor-parallel: {e}") from None
