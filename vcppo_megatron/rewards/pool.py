"""A process pool with a hard per-task deadline, used to run the verifier (VC-PPO §4.1).

sympy can get stuck inside a single C call (e.g. an exact big-integer power) where no signal
handler ever runs, so the only reliable time limit is to kill the worker process. This wraps a
``concurrent.futures.ProcessPoolExecutor`` (forkserver or spawn context: safe to create from a
trainer that already runs torch threads) and:

* keeps at most ``num_workers`` tasks in flight, so a task starts when it is submitted and its
  deadline can be measured from the parent;
* on a missed deadline, kills the workers, gives that task ``default`` and re-runs the other
  in-flight tasks on a fresh pool;
* on a worker crash (``BrokenProcessPool``), re-runs each task that was in flight alone, so the
  task that crashes is identified and gets ``default`` while the innocent ones are recomputed.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

logger = logging.getLogger(__name__)


class PoolUnavailableError(RuntimeError):
    """The worker processes could not be started at all."""


def _ping() -> int:
    """Trivial task used to start every worker before real tasks are timed."""
    return os.getpid()


def _mp_context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """forkserver where available (cheap restarts after a kill), else spawn; never plain fork."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))  # ignored if the fork server already runs
        return ctx
    return multiprocessing.get_context("spawn")


class HardDeadlinePool:
    """Run picklable top-level functions in worker processes with a hard per-task time limit."""

    def __init__(self, num_workers: int, initializer: Callable[[], None] | None = None,
                 preload: Sequence[str] = (), start_timeout_s: float = 120.0) -> None:
        self.num_workers = max(1, int(num_workers))
        self._initializer = initializer
        self._preload = tuple(preload)
        self._start_timeout_s = start_timeout_s
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.pid = os.getpid()  # owner of the workers; a forked child must not use them

    # ---------------------------------------------------------------- life cycle
    def _start(self) -> bool:
        """Start the workers and wait until each has run its initializer; False on failure."""
        try:
            self._executor = ProcessPoolExecutor(
                max_workers=self.num_workers, mp_context=_mp_context(self._preload),
                initializer=self._initializer)
            pings = [self._executor.submit(_ping) for _ in range(self.num_workers)]
            done, not_done = wait(pings, timeout=self._start_timeout_s)
            if not_done or any(f.exception() is not None for f in done):
                raise RuntimeError("verifier workers did not start in time")
            return True
        except Exception:  # noqa: BLE001 - any start-up failure means "no pool"
            logger.warning("could not start the verifier process pool", exc_info=True)
            self._kill()
            return False

    def _kill(self) -> None:
        """Kill the worker processes (they may be stuck in C code) and drop the executor."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        processes = list((getattr(executor, "_processes", None) or {}).values())
        for process in processes:
            if process.is_alive():
                process.kill()
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=5.0)

    def close(self) -> None:
        """Stop the workers: politely if idle, by force after a short grace period."""
        # Bounded wait for a map() running in another thread, so that atexit never hangs.
        locked = self._lock.acquire(timeout=5.0)
        try:
            executor = self._executor
            if executor is None:
                return
            processes = list((getattr(executor, "_processes", None) or {}).values())
            executor.shutdown(wait=False, cancel_futures=True)
            deadline = time.monotonic() + 2.0
            for process in processes:
                process.join(timeout=max(0.0, deadline - time.monotonic()))
            self._kill()
        finally:
            if locked:
                self._lock.release()

    # ---------------------------------------------------------------- running tasks
    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], deadline_s: float,
            default: Any) -> list[Any]:
        """fn(*task) for every task, in order; `default` where a task fails or overruns.

        Raises PoolUnavailableError only when no worker could be started before any task ran.
        """
        results = [default] * len(tasks)
        pending: deque[tuple[int, int]] = deque((i, 0) for i in range(len(tasks)))
        inflight: dict[Future, tuple[int, int, float]] = {}  # future -> (index, crashes, deadline)
        restarted = False
        with self._lock:
            while pending or inflight:
                if self._executor is None and not self._start():
                    if not restarted:
                        raise PoolUnavailableError("verifier workers could not be started")
                    break  # could not restart after a kill: everything left gets the default
                broken = self._submit(fn, tasks, pending, inflight, deadline_s)
                if not broken:
                    broken = self._collect(inflight, pending, results, default)
                expired = [f for f, (_, _, end) in inflight.items() if end <= time.monotonic()]
                if not (broken or expired):
                    continue
                for future in expired:
                    inflight.pop(future)  # its task keeps the default
                # Whatever is still in flight is re-run on a fresh pool; after a crash it is
                # a suspect and runs alone next time.
                for index, crashes, _ in inflight.values():
                    pending.appendleft((index, crashes + 1 if broken else crashes))
                inflight.clear()
                self._kill()
                restarted = True
        return results

    def _submit(self, fn, tasks, pending, inflight, deadline_s) -> bool:
        """Fill the free worker slots; suspects of an earlier crash run alone. True if broken."""
        while pending and len(inflight) < self.num_workers:
            index, crashes = pending[0]
            if crashes and inflight:
                break
            try:
                future = self._executor.submit(fn, *tasks[index])
            except (BrokenProcessPool, RuntimeError):
                return True
            pending.popleft()
            inflight[future] = (index, crashes, time.monotonic() + deadline_s)
            if crashes:
                break
        return False

    @staticmethod
    def _collect(inflight, pending, results, default) -> bool:
        """Wait for the next result or the earliest deadline; True if a worker crashed."""
        if not inflight:
            return False
        first_deadline = min(end for _, _, end in inflight.values())
        timeout = (None if first_deadline == math.inf
                   else max(0.0, first_deadline - time.monotonic()))
        done, _ = wait(list(inflight), timeout=timeout, return_when=FIRST_COMPLETED)
        broken = False
        for future in done:
            index, crashes, _ = inflight.pop(future)
            try:
                results[index] = future.result()
            except BrokenProcessPool:
                broken = True
                if crashes == 0:
                    pending.appendleft((index, 1))  # suspect: re-run alone
                else:
                    results[index] = default  # crashed again while running alone
            except Exception:  # noqa: BLE001 - a failing task just scores the default
                results[index] = default
        return broken
