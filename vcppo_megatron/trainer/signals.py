"""Checkpoint-and-exit requests from the cluster: SIGTERM (preemption, scancel) and SIGUSR1
(SLURM's `--signal=USR1@<seconds>` before the time limit).

The handler only records the signal; the training loop polls `requested()` between steps, so a
checkpoint is never written from inside a signal handler or half-way through an update. All ranks
must agree on the step at which they stop: `requested(group)` all-reduces the flag (MAX), so one
signalled rank is enough.
"""
from __future__ import annotations

import signal
import types

import torch
import torch.distributed as dist

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class CheckpointRequest:
    """Context manager that turns the given signals into a pollable checkpoint-and-exit request."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        """Record the first signal; later ones change nothing (the loop is already stopping)."""
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> CheckpointRequest:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, group: dist.ProcessGroup | None = None) -> bool:
        """Whether any rank of `group` (None: this process only) has received a signal."""
        flag = self.received is not None
        if group is None or not dist.is_initialized():
            return flag
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item())
