"""The processes of a tensor-parallel group on one node, and the channel rank 0 steers them by.

Rank 0 runs the scheduler and the API; every other rank (a *follower*) only runs the model. Rank 0
sends each step's inputs to the followers with `broadcast_object_list` over a gloo group of its own,
even when the model's collectives run on NCCL: step metadata is small Python data that lives on the
host, as in vLLM's CPU group. A failed send marks the group broken for good (NCCL communicators are
not rebuilt in place), and `problem()` says why, for the readiness probe. Spawned followers are
watched too: a follower that exits is reported with its exit code even while the server is idle.
What followers need before the first step goes over a second gloo group, which waits as long as a
model load takes; on the first, rank 0 gives up on a step, PING or STOP that a follower does not take
within STEP_TIMEOUT, so that a wedged follower breaks the group instead of hanging the server.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)

# rank 0 loads the model while followers wait for their first message: allow a 70B load
GROUP_TIMEOUT = timedelta(hours=2)
# rank 0's wait for a serving follower to take a message: it does as soon as its step ends, with rank 0's
STEP_TIMEOUT = timedelta(seconds=60)
PING = "ping"  # keeps idle followers in touch, and finds a dead one within a second
STOP = "stop"
FOLLOWER_EXIT_SECONDS = 10.0


class GroupBroken(RuntimeError):
    """A rank of the tensor-parallel group is gone: the group cannot serve any more."""


class TensorParallelGroup:
    def __init__(self, rank: int, size: int, followers: list[multiprocessing.Process] | None = None):
        self.rank = rank
        self.size = size
        self.followers = followers or []  # processes rank 0 spawned (none under torchrun)
        self.failure: str | None = None
        self.last_sent = time.monotonic()
        self._start_channel = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
        # a gloo timeout is each rank's own: a follower waits for rank 0's next message however long it
        # takes (rank 0 pings it while idle), rank 0 waits for a follower only as long as a step allows
        self._step_channel = dist.new_group(backend="gloo", timeout=STEP_TIMEOUT if rank == 0 else GROUP_TIMEOUT)

    @classmethod
    def join(cls, backend: str, followers: list[multiprocessing.Process] | None = None) -> TensorParallelGroup:
        """Join the group that the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) describes."""
        dist.init_process_group(backend=backend, timeout=GROUP_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), followers)

    def send_at_start(self, message) -> None:
        """Rank 0: hand the followers what they need before the first step (the model path, the KV
        geometry), however long they take to load the model; raises GroupBroken once any rank is gone."""
        self._send(message, self._start_channel)

    def send(self, message) -> None:
        """Rank 0: hand a step, PING or STOP to every follower; raises GroupBroken once any rank is gone
        or does not take the message within STEP_TIMEOUT."""
        self._send(message, self._step_channel)

    def _send(self, message, channel) -> None:
        if self.failure is None:
            self.failure = self._exited_follower()
        if self.failure is not None:
            raise GroupBroken(self.failure)
        try:
            dist.broadcast_object_list([message], src=0, group=channel)
        except Exception as e:
            self.failure = self._exited_follower() or f"a tensor-parallel rank is unreachable: {e}"
            raise GroupBroken(self.failure) from e
        self.last_sent = time.monotonic()

    def break_off(self, reason: str) -> None:
        """Rank 0: the ranks may no longer be in step (one raised mid-step); send nothing more."""
        self.failure = self.failure or reason

    def receive_at_start(self):
        """A follower: the next of what rank 0 sends with `send_at_start`."""
        return self._receive(self._start_channel)

    def receive(self):
        """A follower: the next step, PING or STOP from rank 0 (raises once rank 0 is gone)."""
        return self._receive(self._step_channel)

    @staticmethod
    def _receive(channel):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=channel)
        return box[0]

    def problem(self) -> str | None:
        """Why the group cannot serve, or None while every rank is there."""
        return self.failure or self._exited_follower()

    def _exited_follower(self) -> str | None:
        for rank, process in enumerate(self.followers, start=1):
            if process.exitcode is not None:
                return f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {process.exitcode}"
        return None

    def stop(self) -> None:
        """Rank 0, at shutdown: release the followers, then leave the group."""
        try:
            self.send(STOP)
            grace = FOLLOWER_EXIT_SECONDS
        except GroupBroken:  # a follower that STOP missed (or a wedged one) would not leave on its own
            log.warning("tensor-parallel group already broken at shutdown: %s", self.failure)
            grace = 0.0
        for process in self.followers:
            process.join(grace)
            if process.exitcode is None:
                process.kill()
        dist.destroy_process_group()

    def abandon(self) -> None:
        """Rank 0, after a failed start: kill the followers, then leave the group."""
        kill_followers(self.followers)
        dist.destroy_process_group()


def kill_followers(followers: list[multiprocessing.Process]) -> None:
    """Kill followers whose rank 0 failed to start: they serve nothing yet, but hold their shards' memory
    and would wait for rank 0 until GROUP_TIMEOUT."""
    for process in followers:
        process.kill()
        process.join(FOLLOWER_EXIT_SECONDS)
