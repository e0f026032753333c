"""Checkpoint retention and resuming past an unreadable checkpoint (1 gloo rank, a tiny GPT).

- a truncated shard file is named (step directory and file) by the file check and by the load, which
  used to end in a bare EOFError from torch's reader (a BaseException, not caught as Exception);
- `resume_paired` skips the unreadable actor checkpoint, sets it aside as step_N.unreadable, and
  loads the newest consistent pair (critic and the actor checkpoint it names);
- retention keeps the newest N readable checkpoints, the protected steps and the actors that kept
  critics name, and never deletes the only readable one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_utils import one_gloo_rank
from model_fixtures import tiny_hf_model
from vcppo_megatron.checkpoint import dist as ckpt
from vcppo_megatron.checkpoint.dist import CheckpointReadError, load_checkpoint, save_checkpoint, step_dir_name
from vcppo_megatron.checkpoint.retention import list_checkpoints, prune_paired, resume_paired, retention


@pytest.fixture(scope="module")
def tiny():
    """A tiny GPT on a 1-rank world: (model, process groups)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from vcppo_megatron.models import build_gpt_model

    with one_gloo_rank(megatron_state=True):
        hf = tiny_hf_model("qwen2_tied")
        pgc = ProcessGroupCollection.use_mpu_process_groups()
        yield build_gpt_model(hf.config, attention_backend="sdpa", pg_collection=pgc), pgc


def _save(tiny, root: Path, step: int, value: float, actor_step: int | None = None) -> Path:
    model, pgc = tiny
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    state = {"actor_step": actor_step} if actor_step is not None else {}
    return save_checkpoint(root, step, model=model, pg_collection=pgc, training_state=state)


def _truncate_a_shard(step_dir: Path) -> str:
    shard = max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return shard.name


def test_truncated_shard_is_named_and_resume_takes_the_newest_pair_that_loads(tiny, tmp_path, monkeypatch):
    model, pgc = tiny
    critic, actor = tmp_path / "critic", tmp_path / "actor"
    for step, value in ((1, 1.0), (2, 2.0)):
        _save(tiny, actor, step, value)
        _save(tiny, critic, step, value, actor_step=step)
    bad = actor / step_dir_name(2)
    shard = _truncate_a_shard(bad)
    with pytest.raises(CheckpointReadError, match=f"{bad}: file '{shard}' is truncated"):
        ckpt.verify_checkpoint_files(bad)
    with pytest.raises(CheckpointReadError, match=f"checkpoint {bad}: file '{shard}' is truncated"):
        load_checkpoint(bad, model=model, pg_collection=pgc, load_rng=False)
    # past the file check (e.g. bytes flipped, not cut), torch's reader fails: named, not a bare EOFError
    monkeypatch.setattr(ckpt, "verify_checkpoint_files", lambda step_dir: None)
    with pytest.raises(CheckpointReadError, match=f"checkpoint {bad}: a file cannot be read: rank 0: EOFError"):
        load_checkpoint(bad, model=model, pg_collection=pgc, load_rng=False)
    monkeypatch.undo()

    logs: list[str] = []
    load = lambda d: load_checkpoint(d, model=model, pg_collection=pgc, load_rng=False)  # noqa: E731
    state, critic_dir, actor_dir = resume_paired(critic, actor, load, load, logs.append)
    assert (critic_dir.name, actor_dir.name, state["actor_step"]) == ("step_00000001", "step_00000001", 1)
    assert all(float(p.detach().float().mean()) == 1.0 for p in model.parameters())   # step 1's weights
    assert len(logs) == 2 and str(bad) in logs[0] and shard in logs[0] and "kept for inspection" in logs[0]
    assert "the newest checkpoint that loads" in logs[1], logs
    assert (actor / "step_00000002.unreadable" / shard).is_file() and not bad.exists()   # kept, out of the way
    assert (critic / "step_00000002").is_dir()                                  # readable: left in place
    assert [(r / "latest").read_text().strip() for r in (critic, actor)] == ["step_00000001"] * 2
    # the next resume skips critic 2 (its actor checkpoint is gone) without loading anything
    logs.clear()
    _, critic_dir, _ = resume_paired(critic, actor, load, load, logs.append)
    assert critic_dir.name == "step_00000001" and "step_00000002 is missing" in logs[0]
    # nothing loads: the error lists every checkpoint and why
    _truncate_a_shard(actor / "step_00000001")
    with pytest.raises(CheckpointReadError, match="no checkpoint under .* loads"):
        resume_paired(critic, actor, load, load, logs.append)
    assert resume_paired(tmp_path / "none", actor, load, load, logs.append) is None


def test_retention_keeps_the_newest_readable_protected_and_paired(tiny, tmp_path):
    critic, actor = tmp_path / "critic", tmp_path / "actor"
    _save(tiny, actor, 0, 0.0)
    for step in (0, 1, 2, 3):                       # start + value pretraining: the actor stays at step 0
        _save(tiny, critic, step, float(step), actor_step=0)
    for step in (4, 5, 6):                          # RL
        _save(tiny, actor, step, float(step))
        _save(tiny, critic, step, float(step), actor_step=step)
    assert retention(critic, 0) == ([p for _, p in list_checkpoints(critic)], [])
    assert retention(critic, None)[1] == []
    deleted = prune_paired(critic, actor, keep_last=2, protect={3})           # 3: end of value pretraining
    assert sorted(p.name for p in deleted if p.parent == critic) == ["step_00000000", "step_00000001",
                                                                     "step_00000002", "step_00000004"]
    assert [s for s, _ in list_checkpoints(critic)] == [3, 5, 6]
    assert [s for s, _ in list_checkpoints(actor)] == [0, 5, 6]               # 0: named by kept critic 3
    assert not list(tmp_path.glob("*/.deleting.*"))
    # the two newest critic checkpoints unreadable: they are kept, do not count, and the readable one stays
    for step in (5, 6):
        _truncate_a_shard(critic / step_dir_name(step))
    prune_paired(critic, actor, keep_last=1, protect=set())
    assert [s for s, _ in list_checkpoints(critic)] == [3, 5, 6]
    assert [s for s, _ in list_checkpoints(actor)] == [0, 5, 6]
    meta = json.loads((critic / "step_00000003" / ckpt.TRAINING_STATE_FILE).read_text())
    assert meta == {"actor_step": 0}


def test_without_a_critic_the_actor_checkpoints_alone_resume_and_prune(tiny, tmp_path):
    """GRPO builds no critic: the actor's checkpoints hold the training state (critic root None)."""
    model, pgc = tiny
    actor = tmp_path / "actor"
    for step in (1, 2, 3):
        _save(tiny, actor, step, float(step), actor_step=step)
    shard = _truncate_a_shard(actor / step_dir_name(3))
    logs: list[str] = []
    load = lambda d: load_checkpoint(d, model=model, pg_collection=pgc, load_rng=False)  # noqa: E731
    never = lambda d: pytest.fail(f"no critic to load, got {d}")  # noqa: E731
    state, critic_dir, actor_dir = resume_paired(None, actor, never, load, logs.append)
    assert (critic_dir, actor_dir.name, state["actor_step"]) == (None, "step_00000002", 2)
    assert all(float(p.detach().float().mean()) == 2.0 for p in model.parameters())
    assert shard in logs[0] and "the newest checkpoint that loads" in logs[1], logs
    assert (actor / "latest").read_text().strip() == "step_00000002"
    assert [p.name for p in prune_paired(None, actor, keep_last=1, protect={1})] == []   # 1 protected, 2 newest
    _save(tiny, actor, 4, 4.0, actor_step=4)
    assert [p.name for p in prune_paired(None, actor, keep_last=1, protect=set())] == ["step_00000001",
                                                                                      "step_00000002"]
    assert [s for s, _ in list_checkpoints(actor)] == [4]
    assert resume_paired(None, tmp_path / "none", never, load, logs.append) is None
