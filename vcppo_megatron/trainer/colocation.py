"""Memory hand-over between a rank's rollout engine and its training engines (colocation).

The trainer names the phase it is about to run; `Colocation` moves memory to reach that phase's
resident set as the memory timeline (`parallel/memory_timeline.py`) describes it, the same
description `tools/plan.py` prices, so the plan and what the code frees cannot drift apart. Each
transition releases first (vLLM sleeps; an engine frees its gradient buffers and moves its optimizer
state to host memory), empties PyTorch's cache when vLLM allocates next (vLLM's sleep-mode
allocator maps memory of its own, outside PyTorch's cache), then acquires.

The trainer's calls, in order:
    start_rollout(create)   load -> startup: engines release, vLLM is created (KV cache sized by the plan)
    sync(push)              -> sync (vLLM sleeps, wakes its weights), push, -> rollout (its KV cache wakes)
    generating()            -> rollout
    after_rollout(...)      -> experience (vLLM sleeps: level 2 before a sync, else at most 1)
    updating("actor")       -> actor_update
    updating("critic")      -> critic_update
    sync(push) / wake()     -> sync, push, rollout (RL) / rollout (value pretraining)

vLLM's sleep mode exists on GPU only: on CPU `RolloutEngine.sleep` returns False and vLLM stays
resident (in host memory), so every wake is skipped; the engines' gradient buffers are freed on
CPU too, their optimizer state stays in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import torch

from vcppo_megatron.parallel.memory_timeline import ENGINE_PARTS, ROLES, VLLM_PARTS, Timeline, moves


def empty_cache() -> None:
    """Return PyTorch's cached, unused GPU blocks to the driver (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Colocation:
    """The hand-over for one rank: its training engines by role and, once started, its vLLM engine.

    A role's engine may be None (GRPO builds no critic): its parts are tracked, nothing is moved."""

    def __init__(self, timeline: Timeline, engines: Mapping[str, Any]) -> None:
        if sorted(engines) != sorted(ROLES):
            raise ValueError(f"engines for {sorted(engines)}: expected one per role {ROLES}")
        self.timeline, self.engines = timeline, dict(engines)
        self.rollout: Any = None
        self.phase = "load"
        self.resident = set(timeline.resident("load"))
        self._level = timeline.sleep_level

    # ---- the trainer's calls ----------------------------------------------------------------
    def start_rollout(self, create: Callable[[], Any]) -> Any:
        """Release what start-up does not keep, then create the rollout engine with `create()`."""
        if self.rollout is not None:
            raise RuntimeError("start_rollout: the rollout engine is already running")
        self._enter("startup", create)
        return self.rollout

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """Around generation (training rollouts and evaluation): the rollout phase."""
        self._enter("rollout")
        yield

    def after_rollout(self, *, weights_change: bool) -> None:
        """vLLM sleeps for the forward passes and updates; level 2 (weights discarded) only when
        a sync will refill them (`weights_change`), otherwise at most level 1 (a host copy)."""
        self._level = self.timeline.sleep_level_after_rollout(weights_change)
        self._enter("experience")

    def updating(self, role: str) -> None:
        """Before `role`'s PPO update: its gradients and optimizer state back, the other role's released."""
        if role not in ROLES:
            raise ValueError(f"updating({role!r}): expected one of {ROLES}")
        self._enter(f"{role}_update")

    def sync(self, push: Callable[[], float]) -> float:
        """Run the weight sync `push` (returns its seconds) in the sync phase, then go to rollout.

        vLLM holds its weights but not its KV cache while the actor's weights stream in; right after
        start-up it is put to sleep first (it cannot free its KV cache alone), then its weights wake."""
        self._enter("sync")
        try:
            return push()
        finally:
            self._enter("rollout")

    def wake(self) -> None:
        """Back to rollout without a sync (value pretraining: vLLM wakes with the weights it had)."""
        self._enter("rollout")

    # ---- transitions ------------------------------------------------------------------------
    def _enter(self, phase: str, create: Callable[[], Any] | None = None) -> None:
        """Move from the current resident set to `phase`'s: release, empty the cache, acquire."""
        target = self.timeline.resident(phase)
        release, acquire = moves(self.resident, target)
        # vLLM frees its weights and KV cache together: what the phase keeps of them wakes again
        # below (an engine that cannot sleep, as on CPU, stays resident)
        if release & set(VLLM_PARTS) and self.rollout.sleep(level=self._level):
            self.resident -= set(VLLM_PARTS)
        for role in ROLES:
            parts = [p for p in ENGINE_PARTS if f"{role}.{p}" in release]
            if parts and self.engines[role] is not None:
                self.engines[role].offload(parts)
                self.resident -= {f"{role}.{p}" for p in parts}
        wake = [p for p in VLLM_PARTS if p in target and p not in self.resident]
        if wake:
            empty_cache()
            if self.rollout is None:
                if create is None:
                    raise RuntimeError(f"{self.phase} -> {phase}: no rollout engine to wake; start_rollout first")
                self.rollout = create()
            else:
                self.rollout.wake_up(None if len(wake) == len(VLLM_PARTS) else [p.split(".")[1] for p in wake])
            self.resident |= set(wake)
        for role in ROLES:
            parts = [p for p in ENGINE_PARTS if f"{role}.{p}" in acquire]
            if parts and self.engines[role] is not None:
                self.engines[role].onload(parts)
                self.resident |= {f"{role}.{p}" for p in parts}
        self.phase = phase


def rollout_memory(cfg: Any, hf_config: Mapping[str, Any], world: int) -> tuple[Any, float | None, str]:
    """(rollout config with the KV cache size, vLLM's share of the GPU, a line to print) on a GPU.

    With `rollout.kv_cache_bytes` null the KV cache gets what the timeline's rollout phase leaves of
    `rollout.gpu_memory_utilization` of this GPU; vLLM is told its own share (weights + KV cache +
    runtime), which it checks against the free memory when it starts beside the engines' weights.
    Without CUDA the config is returned unchanged (vLLM on CPU needs an explicit size)."""
    if not torch.cuda.is_available():
        return cfg.rollout, None, ""
    from vcppo_megatron.parallel.memory_plan import GIB, timeline_plan

    total = torch.cuda.mem_get_info()[1]
    plan = timeline_plan(cfg, hf_config, world, float(total))
    rollout = dataclasses.replace(cfg.rollout, kv_cache_bytes=int(plan.kv_cache_bytes))
    peak = plan.peak
    line = (f"== memory timeline: KV cache {plan.kv_cache_bytes / GIB:.1f} GiB per GPU "
            f"({plan.kv_sequences:.0f} full-length sequences), vLLM's share {plan.vllm_fraction:.3f}; planned peak "
            f"{peak.total / GIB:.1f} of {total / GIB:.1f} GiB ({peak.phase}); tools/plan.py prints every phase")
    return rollout, min(plan.vllm_fraction, 1.0), line
