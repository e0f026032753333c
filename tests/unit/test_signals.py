"""CheckpointRequest: SIGTERM / SIGUSR1 become a pollable request; handlers are restored; one
signalled rank makes every rank stop at the same step (2 gloo ranks)."""
from __future__ import annotations

import os
import signal

from dist_utils import run_gloo
from vcppo_megatron.trainer.signals import CheckpointRequest


def test_signal_sets_request_and_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        with CheckpointRequest() as req:
            assert not req.requested()
            os.kill(os.getpid(), sig)                     # delivered before kill() returns
            os.kill(os.getpid(), signal.SIGUSR1)          # a second signal changes nothing
            assert req.requested() and req.received == sig
        assert {s: signal.getsignal(s) for s in before} == before


def _worker(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    with CheckpointRequest() as req:
        assert not req.requested(dist.group.WORLD)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert req.requested(dist.group.WORLD)            # rank 0 was not signalled itself
        assert req.requested() == (rank == 1)


def test_one_signalled_rank_stops_all_ranks():
    run_gloo(_worker, 2)
