"""A run's checkpoints: the actor / critic pair under `<output_dir>/checkpoints`.

`RunCheckpoints` saves a step (the critic, and the actor when asked, each with its optimizer,
schedule, RNG and the trainer's state), resumes from the newest pair that reads (an unreadable one
is reported and set aside, checkpoint/retention.py), prunes old pairs after each save
(`trainer.keep_last_checkpoints`, `keep_checkpoint_steps`) and loads a chosen value-pretraining
checkpoint. A run without a critic (GRPO) keeps its state in the actor's checkpoints alone.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from vcppo_megatron.checkpoint import HF_SUBDIR, copy_hf_files
from vcppo_megatron.checkpoint.dist import (
    layout_of,
    load_checkpoint,
    read_checkpoint_meta,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from vcppo_megatron.checkpoint.retention import prune_paired, resume_paired


def _optimizer_if_stepped(engine: Any) -> Any:
    """The engine's optimizer if it holds Adam state (a fresh one has none to save)."""
    optimizer = engine.core.optimizer
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return optimizer if any(opt.optimizer.state for opt in chained) else None


def _load_engine(path: Path, engine: Any, pgs: Any, model_config: Any) -> dict[str, Any]:
    """Load an engine's checkpoint, with its optimizer state when the checkpoint has one.

    Saved at another layout (TP / PP / world size), the RNG states are not restored (they are per
    rank) and the optimizer state loads only if it was saved `fully_reshardable`.
    """
    meta = read_checkpoint_meta(path)
    here = layout_of(pgs)
    same_layout = all(meta["layout"][k] == here[k] for k in ("tp", "pp", "world_size"))
    if not same_layout and dist.get_rank() == 0:
        print(f"== {path} was saved at layout {meta['layout']}, this run is {here}: its RNG states are not "
              f"restored, so later metrics will not match an uninterrupted run exactly", flush=True)
    return load_checkpoint(path, model=engine.core.model, pg_collection=pgs,
                           optimizer=engine.core.optimizer if meta["contents"]["optimizer"] else None,
                           scheduler=engine.core.scheduler, model_config=model_config, load_rng=same_layout)


class RunCheckpoints:
    """The checkpoints of one run (every rank holds one; rank 0 writes the HF files and prunes)."""

    def __init__(self, cfg: Any, root: Path, *, actor: Any, actor_pgs: Any, actor_hf_config: Any,
                 model_dir: Path, critic: Any | None, critic_pgs: Any, say: Callable[[str], None]) -> None:
        self.cfg, self.root = cfg, Path(root)
        self.actor, self.actor_pgs, self.actor_hf_config = actor, actor_pgs, actor_hf_config
        self.model_dir = model_dir
        self.critic, self.critic_pgs = critic, critic_pgs
        self.say = say                       # the trainer's print on its logging rank
        self.rank = dist.get_rank()

    @property
    def critic_root(self) -> Path | None:
        return None if self.critic is None else self.root / "critic"

    def save(self, global_step: int, state: dict[str, Any], *, actor: bool) -> None:
        """Checkpoint the critic (and the actor when `actor`) with `state`, then apply retention."""
        t0 = time.perf_counter()
        fmt = self.cfg.trainer.checkpoint_optimizer_format
        if actor:
            step_dir = save_checkpoint(self.root / "actor", global_step, model=self.actor.core.model,
                                       pg_collection=self.actor_pgs, optimizer=_optimizer_if_stepped(self.actor),
                                       scheduler=self.actor.core.scheduler, training_state=state,
                                       model_config=self.actor_hf_config, optimizer_format=fmt)
            if self.rank == 0:          # config + tokenizer: converters and tools/evaluate.py read them
                copy_hf_files(self.model_dir, step_dir / HF_SUBDIR)
        if self.critic is not None:
            save_checkpoint(self.root / "critic", global_step, model=self.critic.core.model,
                            pg_collection=self.critic_pgs, optimizer=_optimizer_if_stepped(self.critic),
                            scheduler=self.critic.core.scheduler, training_state=state,
                            model_config=self.critic.hf_config, optimizer_format=fmt)
        self.say(f"== checkpoint step {global_step} ({state['phase']} step {state['phase_step']}) "
                 f"saved in {time.perf_counter() - t0:.1f}s under {self.root}")
        self.prune()

    def resume(self) -> tuple[dict[str, Any], Path | None, Path] | None:
        """Load the newest pair that reads: (training state, critic dir or None, actor dir); None
        when there is none. The critic checkpoint names its actor checkpoint (`actor_step`)."""
        critic = self.critic
        return resume_paired(self.critic_root, self.root / "actor",
                             lambda d: _load_engine(d, critic, self.critic_pgs, critic.hf_config),
                             lambda d: _load_engine(d, self.actor, self.actor_pgs, self.actor_hf_config),
                             log=lambda text: print(text, flush=True))

    def prune(self) -> None:
        """Retention after a save (rank 0): trainer.keep_last_checkpoints, keep_checkpoint_steps and
        the end of value pretraining (trainer.value_checkpoint may name it) are kept."""
        tc = self.cfg.trainer
        if self.rank != 0 or not tc.keep_last_checkpoints:
            return
        protect = set(tc.keep_checkpoint_steps) | ({tc.value_pretrain_steps} if tc.value_pretrain_steps else set())
        deleted = prune_paired(self.critic_root, self.root / "actor", tc.keep_last_checkpoints, protect)
        if deleted:
            print(f"== checkpoint retention (trainer.keep_last_checkpoints = {tc.keep_last_checkpoints}): deleted "
                  + ", ".join(f"{p.parent.name}/{p.name}" for p in deleted), flush=True)

    def load_value(self, path: str) -> None:
        """Start RL from a chosen value-pretraining checkpoint (weights only; an unreadable file is named)."""
        step_dir = resolve_checkpoint_dir(path)
        load_checkpoint(step_dir, model=self.critic.core.model, pg_collection=self.critic_pgs, load_rng=False,
                        model_config=self.critic.hf_config)
        self.critic.core.optimizer.reload_model_params()
        self.say(f"== critic from the value checkpoint {step_dir} (trainer.value_checkpoint)")
