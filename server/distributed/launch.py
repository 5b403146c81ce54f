"""Forming the tensor-parallel group of `reft-server serve --tensor-parallel N` on one node.

Two ways in, with the same result (rank 0 serves, ranks 1..N-1 follow):
- torchrun starts the N processes (`torchrun --nproc-per-node N --no-python reft-server serve
  --tensor-parallel N`) and, by default, takes the whole group down when one of them dies;
- a plain `reft-server serve --tensor-parallel N` spawns the N-1 followers itself on a loopback port,
  so a container's single entrypoint needs no launcher, and it watches them for readiness.
NCCL joins the ranks on GPUs (rank r uses GPU r), gloo on CPUs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist

from server.config import Settings
from server.distributed.group import TensorParallelGroup, kill_followers
from server.distributed.runner import follow
from server.gc_freeze import exit_without_teardown
from server.logging_setup import setup_logging
from server.model_load_errors import ModelLoadError
from server.models.loader import resolve_device
from server.start_checks import StartUpMistake

log = logging.getLogger(__name__)


def rank_device(settings: Settings, local_rank: int) -> torch.device:
    """The device of the rank with `local_rank`; binds it as the current GPU."""
    device = resolve_device(settings.device)
    if device.type != "cuda":
        return device
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join_torchrun_group(settings: Settings) -> TensorParallelGroup | None:
    """The group torchrun started this process in, or None outside torchrun (or with one process)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != settings.tensor_parallel:
        raise StartUpMistake(
            f"torchrun started {world_size} processes but --tensor-parallel is {settings.tensor_parallel}: "
            "they must be equal (one process per GPU of the group)"
        )
    if world_size == 1:
        return None
    device = rank_device(settings, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    return TensorParallelGroup.join(_backend(device))


def follow_under_torchrun(group: TensorParallelGroup, settings: Settings) -> None:
    """A follower torchrun started. torchrun passes SIGTERM to every rank; a follower ignores it, so
    rank 0 drains its requests and then stops the followers (torchrun kills what is left after its own
    timeout)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    follow(group, settings, rank_device(settings, int(os.environ.get("LOCAL_RANK", group.rank))))
    dist.destroy_process_group()


def spawn_group(settings: Settings) -> TensorParallelGroup:
    """Start ranks 1..N-1 of a group on this host and join it as rank 0."""
    size = settings.tensor_parallel
    with socket.socket() as probe:  # a free port for the group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(size), RANK="0", LOCAL_RANK="0")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or CUDA state
    followers = [
        context.Process(target=_follower_main, args=(settings, rank), name=f"reft-tp-rank{rank}", daemon=True)
        for rank in range(1, size)
    ]
    for process in followers:
        process.start()
    try:
        return TensorParallelGroup.join(_backend(rank_device(settings, 0)), followers)
    except BaseException:
        kill_followers(followers)
        raise


def _follower_main(settings: Settings, rank: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C drains rank 0, which then stops the followers
    setup_logging(settings.log_level, settings.log_json)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    device = rank_device(settings, rank)
    group = TensorParallelGroup.join(_backend(device))
    try:
        follow(group, settings, device)
    except ModelLoadError as e:  # rank 0 reads the same files and says it in one line: no traceback here
        log.error("tensor-parallel rank %d: %s", rank, e)
        sys.exit(2)
    dist.destroy_process_group()
    exit_without_teardown(0)
