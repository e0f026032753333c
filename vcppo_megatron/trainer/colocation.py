"""Memory hand-over between a rank's rollout engine and its training engines (colocation).

One RL step on a rank, with `rollout.sleep_level` = L > 0 and `trainer.offload_during_rollout`:

    generating():  engines.offload()        gradient buffers freed; on CUDA optimizer state -> host
                   ... vLLM samples ...
                   engines.onload()
    after_rollout: vLLM sleeps at L         (value pretraining: at most 1, its weights stay valid)
                   ... values, log-probs, PPO updates ...
    sync(push):    vLLM wakes its weights, push() streams the actor's weights in, vLLM wakes its
                   KV cache                 (value pretraining: wake() instead, nothing to push)

vLLM's sleep mode exists on GPU only: on CPU `RolloutEngine.sleep` returns False and every wake
here is skipped, so the CPU tests cover the order of calls and the engines' offload, not the
GPU memory released (docs/ARCHITECTURE.md, "GPU memory plan").
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence


class Colocation:
    """The hand-over for one rank: `rollout` (a RolloutEngine) and the engines trained here."""

    def __init__(self, rollout: Any, engines: Sequence[Any], *, sleep_level: int, offload: bool) -> None:
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level = {sleep_level}: expected 0, 1 or 2")
        self.rollout, self.engines = rollout, list(engines)
        self.sleep_level, self.offload = sleep_level, offload
        self.asleep = False

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """Around generation: the training engines' memory is released, then brought back."""
        if self.offload:
            for engine in self.engines:
                engine.offload()
        try:
            yield
        finally:
            if self.offload:
                for engine in self.engines:
                    engine.onload()

    def after_rollout(self, *, weights_change: bool) -> None:
        """Put vLLM to sleep for the training part of the step.

        Level 2 discards the weights, so it is used only when a sync will refill them
        (`weights_change`); otherwise level 1 keeps a host copy that `wake` restores.
        """
        if self.sleep_level == 0:
            return
        level = self.sleep_level if weights_change else 1
        self.asleep = bool(self.rollout.sleep(level=level))

    def sync(self, push: Callable[[], float]) -> float:
        """Wake vLLM's weights, run `push` (the weight sync; returns its seconds), wake the KV cache."""
        if self.asleep:
            self.rollout.wake_up(["weights"])
        try:
            return push()
        finally:
            if self.asleep:
                self.rollout.wake_up(["kv_cache"])
                self.asleep = False

    def wake(self) -> None:
        """Wake vLLM with the weights it had (no sync)."""
        if self.asleep:
            self.rollout.wake_up()
            self.asleep = False
