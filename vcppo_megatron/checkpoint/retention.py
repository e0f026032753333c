"""Which checkpoints stay on disk, and which pair a run resumes from when the newest cannot be read.

A run writes `<output_dir>/checkpoints/critic/step_N` at every checkpoint and
`.../actor/step_N` when the actor changed; each critic checkpoint's training state names its actor
checkpoint (`actor_step`), so a resume loads a consistent pair.

Retention (`prune_paired`, rank 0 after a save): per role the newest `keep_last` checkpoints whose
files pass `verify_checkpoint_files` are kept, with every checkpoint newer than the oldest of them
(an unreadable one is kept for inspection and never counted, so retention cannot delete the only
good one), the protected steps (`trainer.keep_checkpoint_steps`, the end of value pretraining) and
the actor checkpoints that the kept critic checkpoints name. A deleted directory is first renamed
to `.deleting.step_N`, so an interrupted deletion never leaves something that looks like a checkpoint.

Resume (`resume_paired`, collective): critic checkpoints newest first; a pair whose files are
missing or truncated, or whose load fails reading a file, is reported with the step directory and
the file, renamed to `step_N.unreadable` (kept for inspection, out of the way of the step the run
will write again) and skipped; the first pair that loads on every rank is the one resumed from.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Collection, Optional

import torch.distributed as dist

from vcppo_megatron.checkpoint.dist import (
    META_FILE,
    CheckpointReadError,
    read_training_state,
    step_dir_name,
    verify_checkpoint_files,
    write_latest,
)

STEP_DIR = re.compile(r"^step_(\d{8})$")
UNREADABLE_SUFFIX = ".unreadable"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of the complete step directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / META_FILE).is_file()]
    return sorted(found)


def _readable(step_dir: Path) -> bool:
    try:
        verify_checkpoint_files(step_dir)
        return True
    except CheckpointReadError:
        return False


def retention(root: str | os.PathLike, keep_last: Optional[int],
              protect: Collection[int] = ()) -> tuple[list[Path], list[Path]]:
    """(kept, to delete) among `root`'s checkpoints: see the module docstring. keep_last 0 / None keeps all."""
    found = list_checkpoints(root)
    if not keep_last:
        return [p for _, p in found], []
    kept, delete, good = [], [], 0
    for step, path in reversed(found):                       # newest first
        if good < keep_last:
            kept.append(path)
            good += _readable(path)
        elif step in protect:
            kept.append(path)
        else:
            delete.append(path)
    return kept[::-1], delete[::-1]


def _delete(path: Path) -> None:
    """Rename out of the checkpoint namespace, then remove."""
    doomed = path.with_name(f".deleting.{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_paired(critic_root: str | os.PathLike | None, actor_root: str | os.PathLike, keep_last: Optional[int],
                 protect: Collection[int] = ()) -> list[Path]:
    """Delete the critic and actor checkpoints retention does not keep; returns what was deleted.

    Not collective: rank 0 calls it after a save. Actor checkpoints named by a kept critic
    checkpoint are kept; if a kept critic's training state cannot be read, no actor is deleted.
    `critic_root` None: a run without a critic (GRPO), the actor's checkpoints alone.
    """
    if critic_root is None:
        _, delete = retention(actor_root, keep_last, protect)
        for path in delete:
            _delete(path)
        return delete
    kept_critic, delete = retention(critic_root, keep_last, protect)
    paired: set[int] = set()
    try:
        paired = {int(read_training_state(p)["actor_step"]) for p in kept_critic
                  if read_training_state(p).get("actor_step") is not None}
        _, delete_actor = retention(actor_root, keep_last, set(protect) | paired)
    except (CheckpointReadError, KeyError, TypeError, ValueError):
        delete_actor = []
    for path in delete + delete_actor:
        _delete(path)
    return delete + delete_actor


def set_aside(step_dir: Path) -> Path:
    """Rename an unreadable checkpoint to `step_N.unreadable` (`.unreadable.2`, ... if taken)."""
    target, n = step_dir.with_name(step_dir.name + UNREADABLE_SUFFIX), 1
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{UNREADABLE_SUFFIX}.{n}")
    os.replace(step_dir, target)
    return target


def _agree(failure: Optional[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every rank's failure (directory, message) of the last attempt; the same list on all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [failure] if failure else []
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, failure)
    return list(dict.fromkeys(p for p in parts if p))


def _attempt(load: Callable[[Path], Any], step_dir: Path, out: list) -> Optional[tuple[str, str]]:
    try:
        out.append(load(step_dir))
        return None
    except CheckpointReadError as e:
        return str(step_dir), str(e)


def _check_pair(critic_dir: Path, actor_root: Path) -> tuple[Optional[Path], Optional[tuple[str, str]]]:
    """The actor checkpoint a critic checkpoint names, and the first file problem of the pair (no loading)."""
    try:
        verify_checkpoint_files(critic_dir)
        actor_step = read_training_state(critic_dir).get("actor_step")
    except CheckpointReadError as e:
        return None, (str(critic_dir), str(e))
    if actor_step is None:
        return None, (str(critic_dir), f"checkpoint {critic_dir}: its training state names no actor checkpoint")
    actor_dir = actor_root / step_dir_name(int(actor_step))
    if not (actor_dir / META_FILE).is_file():
        return actor_dir, ("", f"checkpoint {critic_dir}: its actor checkpoint {actor_dir} is missing")
    try:
        verify_checkpoint_files(actor_dir)
    except CheckpointReadError as e:
        return actor_dir, (str(actor_dir), str(e))
    return actor_dir, None


def _check_actor(actor_dir: Path) -> tuple[Path, Optional[tuple[str, str]]]:
    """An actor checkpoint of a run without a critic, and its first file problem (no loading)."""
    try:
        verify_checkpoint_files(actor_dir)
    except CheckpointReadError as e:
        return actor_dir, (str(actor_dir), str(e))
    return actor_dir, None


def resume_paired(critic_root: str | os.PathLike | None, actor_root: str | os.PathLike,
                  load_critic: Callable[[Path], dict[str, Any]], load_actor: Callable[[Path], Any],
                  log: Callable[[str], None]) -> Optional[tuple[dict[str, Any], Optional[Path], Path]]:
    """Load the newest critic checkpoint that loads and the actor checkpoint it names (collective).

    `load_critic(dir)` returns the training state; both raise CheckpointReadError for unreadable
    files (other errors, e.g. a checkpoint of another model, propagate). Unreadable checkpoints are
    reported through `log` (called on rank 0 only) and set aside. Returns (training state, critic dir, actor dir),
    or None when there is no checkpoint; raises CheckpointReadError when none loads.
    `critic_root` None: a run without a critic (GRPO): the actor's checkpoints hold the training
    state, `load_actor` returns it and the critic dir returned is None.
    """
    actor_root = Path(actor_root)
    anchor_root = actor_root if critic_root is None else Path(critic_root)   # holds the training state
    check = _check_actor if critic_root is None else (lambda d: _check_pair(d, actor_root))
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    box: list[Any] = [list_checkpoints(anchor_root)[::-1] if rank0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)               # every rank tries the same candidates
    candidates, problems = box[0], []
    for _, anchor_dir in candidates:
        box = [check(anchor_dir) if rank0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        actor_dir, failure = box[0]
        failures = [failure] if failure else []
        state: list[Any] = []
        if not failures:
            failures = _agree(_attempt(load_actor if critic_root is None else load_critic, anchor_dir, state))
        if not failures and critic_root is not None:
            failures = _agree(_attempt(load_actor, actor_dir, []))
        if not failures:
            pair = anchor_dir if critic_root is None else f"{anchor_dir} (actor {actor_dir.name})"
            if problems and rank0:
                log(f"== resuming from {pair}, the newest checkpoint that loads; "
                    f"the newer ones could not be read: " + "; ".join(problems))
            if rank0:                          # `latest` pointed at what was set aside
                write_latest(anchor_root, anchor_dir.name)
                if critic_root is not None:
                    write_latest(actor_root, actor_dir.name)
            return state[0], (None if critic_root is None else anchor_dir), actor_dir
        for bad_dir, message in failures:
            kept = ""
            if rank0 and bad_dir and Path(bad_dir).is_dir():
                kept = f" (kept for inspection as {set_aside(Path(bad_dir))})"
            problems.append(message + kept)
            if rank0:
                log(f"== cannot resume from {anchor_dir}: {message}{kept}; trying an older checkpoint")
        if dist.is_initialized():
            dist.barrier()
    if not candidates:
        return None
    raise CheckpointReadError(f"no checkpoint under {anchor_root} loads"
                              + ("" if critic_root is None else " with its actor checkpoint") + ": "
                              + "; ".join(problems))

