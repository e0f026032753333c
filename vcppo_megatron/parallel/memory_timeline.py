"""The GPU memory timeline of colocated training: what each GPU holds in each phase of a run.

One description, read by both sides so that they cannot drift apart: the colocation code
(`trainer/colocation.py`) moves memory to reach each phase's resident set, and the memory plan
(`parallel/memory_plan.py`, printed by `tools/plan.py`) prices each phase in bytes.

State parts, which the colocation code moves between phases:
    <role>.weights    the training weights of the actor / critic (Megatron DDP's parameter buffer)
    <role>.grads      the DDP gradient buffers (freed; zeroed when brought back)
    <role>.optimizer  the distributed optimizer's fp32 master weights and Adam moments (moved to host
                      memory; only with bf16 weights on CUDA, see `Timeline.from_config`)
    vllm.weights      vLLM's weights (sleep level 1 keeps a host copy, level 2 discards them)
    vllm.kv_cache     vLLM's KV cache (freed on sleep)
Work buffers live only inside a phase and are priced by the plan, not moved: the activations and
logits of the role at work, the weight-sync buffers, vLLM's runtime (CUDA graphs, sampler and
activation workspace: PyTorch allocations that sleep mode does not free), and the reserved bytes.

Phases, with the 32B recipes' settings (`rollout.sleep_level` > 0, `trainer.offload_during_rollout`):
    load           the engines are built and load their weights / checkpoint: everything resident
    startup        vLLM starts beside the engines' weights (their gradients and optimizer state are
                   released first); then the first sync, as in every RL step
    rollout        vLLM generates; the engines hold their weights only
    experience     vLLM sleeps; forward passes: old log-probs (actor) and values (critic)
    actor_update   the actor's PPO mini-batches: its weights, gradients and optimizer state
    critic_update  the critic's, with the actor back to its weights only
    sync           vLLM's weights are back (not its KV cache); the actor's weights stream in
The run starts load -> startup -> sync -> rollout (vLLM sleeps right after its start, so that the
actor's weights stream in without the KV cache, as in every sync). An RL step is rollout ->
experience -> actor_update -> critic_update -> sync -> rollout; a
value-pretraining step is rollout -> experience -> critic_update -> rollout (vLLM sleeps at level
<= 1 there, so it wakes with the weights it had). Every transition releases before it acquires,
and empties PyTorch's cache before vLLM allocates (`TRANSITION_RULES`). With `sleep_level` = 0 vLLM
stays resident throughout; with `offload_during_rollout` false each engine keeps everything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

ROLES = ("actor", "critic")
ENGINE_PARTS = ("weights", "grads", "optimizer")
VLLM_PARTS = ("vllm.weights", "vllm.kv_cache")
PHASES = ("load", "startup", "rollout", "experience", "actor_update", "critic_update", "sync")
STEPS: dict[str, tuple[str, ...]] = {
    "rl": ("rollout", "experience", "actor_update", "critic_update", "sync"),
    "value_pretrain": ("rollout", "experience", "critic_update"),
}
"""The phases of one step of each kind, in order; the next step starts again at rollout."""
TRANSITION_RULES = ("release before acquire", "empty PyTorch's cache before vLLM allocates")


def part(role: str, name: str) -> str:
    """The timeline's name of one engine part, e.g. part('actor', 'grads') = 'actor.grads'."""
    if role not in ROLES or name not in ENGINE_PARTS:
        raise ValueError(f"part({role!r}, {name!r}): expected a role in {ROLES} and a part in {ENGINE_PARTS}")
    return f"{role}.{name}"


@dataclass(frozen=True)
class Phase:
    """One phase: its state parts resident on the GPU, and the work buffers priced inside it."""

    name: str
    resident: frozenset[str]
    work: tuple[str, ...]
    doc: str


@dataclass(frozen=True)
class Timeline:
    """The resident set of every phase for one run's colocation settings (pure: no torch)."""

    sleep_level: int
    offload: bool
    optimizer_to_host: tuple[bool, bool]
    """Per role (actor, critic): whether releasing its optimizer state moves it to host memory.
    False with fp32 weights: the optimizer's master weights are views of the model's, so the
    state stays where it is (on the GPU, counted resident)."""

    def __post_init__(self) -> None:
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.sleep_level = {self.sleep_level}: expected 0, 1 or 2")

    @classmethod
    def from_config(cls, cfg: Any) -> "Timeline":
        """The timeline of a Config (rollout.sleep_level, trainer.offload_during_rollout, params dtypes)."""
        return cls(sleep_level=cfg.rollout.sleep_level, offload=cfg.trainer.offload_during_rollout,
                   optimizer_to_host=(cfg.actor.params_dtype != "float32", cfg.critic.params_dtype != "float32"))

    # ---- resident sets ----------------------------------------------------------------------
    def _engine(self, role: str, training: bool) -> set[str]:
        """What `role` holds: everything while it trains (or without offload), else its weights
        (and its optimizer state where releasing it would not move it off the GPU)."""
        if training or not self.offload:
            return {part(role, p) for p in ENGINE_PARTS}
        kept = {part(role, "weights")}
        if not self.optimizer_to_host[ROLES.index(role)]:
            kept.add(part(role, "optimizer"))
        return kept

    def _vllm(self, phase: str) -> set[str]:
        if phase == "load":
            return set()
        if self.sleep_level == 0 or phase in ("startup", "rollout"):
            return set(VLLM_PARTS)
        return {"vllm.weights"} if phase == "sync" else set()

    def phase(self, name: str) -> Phase:
        """The Phase called `name` (one of PHASES)."""
        if name not in PHASES:
            raise ValueError(f"phase {name!r}: expected one of {PHASES}")
        training = {"load": ROLES, "actor_update": ("actor",), "critic_update": ("critic",)}.get(name, ())
        resident = set(self._vllm(name))
        for role in ROLES:
            resident |= self._engine(role, role in training)
        runtime = () if name == "load" else ("vllm.runtime",)
        work = {"load": (), "startup": (), "rollout": (),
                "experience": ("actor.forward", "critic.forward"),
                "actor_update": ("actor.activations",), "critic_update": ("critic.activations",),
                "sync": ("sync_buffers",)}[name]
        return Phase(name, frozenset(resident), runtime + work, _DOCS[name])

    def work(self, name: str, step: str) -> tuple[str, ...]:
        """The work buffers of phase `name` in a `step`: value pretraining runs no actor forward."""
        work = self.phase(name).work
        return tuple(w for w in work if not (step == "value_pretrain" and w == "actor.forward"))

    def resident(self, name: str) -> frozenset[str]:
        """The state parts on the GPU during phase `name`."""
        return self.phase(name).resident

    def sleep_level_after_rollout(self, weights_change: bool) -> int:
        """vLLM's sleep level after sampling: level 2 discards its weights, so only when a sync
        refills them; otherwise (value pretraining) at most 1, which keeps a host copy."""
        return self.sleep_level if weights_change else min(self.sleep_level, 1)

    def host(self, name: str, step: str) -> frozenset[str]:
        """The state parts held in host memory during phase `name` of a `step` ('rl' or
        'value_pretrain'): released optimizer states, and vLLM's weights asleep at level 1."""
        on_gpu = self.resident(name)
        out = {part(r, "optimizer") for i, r in enumerate(ROLES)
               if self.optimizer_to_host[i] and part(r, "optimizer") not in on_gpu}
        asleep = "vllm.weights" not in on_gpu and name not in ("load",)
        if asleep and self.sleep_level_after_rollout(step == "rl") == 1:
            out.add("vllm.weights")
        return frozenset(out)

    def rows(self, value_pretrain: bool = True) -> list[tuple[str, str]]:
        """(step, phase) rows of a run: the start (with its first sync), one RL step and (if it runs)
        one value-pretraining step."""
        steps = [s for s in STEPS if value_pretrain or s != "value_pretrain"]
        return [("start", "load"), ("start", "startup"), ("start", "sync")] + [(s, p) for s in steps
                                                                             for p in STEPS[s]]


def moves(before: Iterable[str], after: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(parts to release, parts to acquire) to go from one resident set to another."""
    before, after = frozenset(before), frozenset(after)
    return before - after, after - before


_DOCS = {
    "load": "engines built, HF weights or checkpoint loaded; no vLLM yet",
    "startup": "engines keep their weights; vLLM starts (KV cache sized by the plan, profile run)",
    "rollout": "vLLM samples; engines hold their weights only",
    "experience": "vLLM asleep; forward passes: old log-probs (actor), values (critic)",
    "actor_update": "the actor's PPO mini-batches and optimizer steps",
    "critic_update": "the critic's PPO mini-batches and optimizer steps",
    "sync": "vLLM's weights awake (KV cache not yet); the actor's weights stream in",
}
