"""The VC-PPO trainer (VC-PPO Alg. 1; VAPO §4-5): SFT cold start, value pretraining, RL.

Every rank runs `Trainer.run`. Each rank holds its actor and critic shards (Megatron engines over
the same tensor / pipeline layout) and one vLLM engine; a rollout replica (rollout.tensor_parallel_size
ranks) samples its share of the step's prompts, and the ranks of one training replica gather their
samples so that they train on the same rows. One step:

    prompts -> vLLM samples -> verifier rewards -> old log-probs (actor) and values (critic)
    -> fused decoupled GAE (λ_actor or length-adaptive; λ_critic) -> PPO epochs x mini-batches for
    the actor and the critic -> actor weights into vLLM

Value pretraining (§3.2) is the same step with the actor frozen and λ_critic = 1. Checkpoints
(actor and critic with their optimizers and schedules, RNG, data position, phase and step) are
written every `trainer.checkpoint_interval` steps, at the end of each phase, and when SIGTERM /
SIGUSR1 arrives; a run started on the same `trainer.output_dir` resumes from the latest one.
Sampling seeds and shuffles derive from (seed, step), so a resumed run repeats the metrics of an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vcppo_megatron.algorithms.advantages import compute_advantages, needs_critic
from vcppo_megatron.algorithms.metrics import MetricAccumulator
from vcppo_megatron.algorithms.position_stats import PositionStats
from vcppo_megatron.config import ConfigError, derive_batch_sizes
from vcppo_megatron.config.schema import Config
from vcppo_megatron.data.prompts import PromptOrder
from vcppo_megatron.engines import PolicyEngine, ValueEngine
from vcppo_megatron.logging import MetricWriter, ProgressLine
from vcppo_megatron.models.registry import LAYER_SPEC_BACKENDS, check_transformer_engine
from vcppo_megatron.parallel.groups import build_role_groups
from vcppo_megatron.parallel.memory_timeline import Timeline
from vcppo_megatron.rollout import RolloutEngine
from vcppo_megatron.rollout.sync import (
    hf_weight_buckets,
    iter_bucket_tensors,
    sync_to_rollout,
)
from vcppo_megatron.trainer import setup
from vcppo_megatron.trainer.checkpointing import RunCheckpoints
from vcppo_megatron.trainer.colocation import Colocation, rollout_memory
from vcppo_megatron.trainer.evaluation import held_out_metrics, per_problem, sampling, split_by_set
from vcppo_megatron.trainer.experience import (
    build_experience,
    gather_samples,
    logprob_abs_diff,
    sample_and_score,
    values_of_tokens,
)
from vcppo_megatron.trainer.ppo import (
    UpdateResult,
    actor_loss_fn,
    critic_loss_fn,
    ppo_update,
)
from vcppo_megatron.trainer.signals import CheckpointRequest

PHASES = ("sft", "value_pretrain", "rl", "done")


def _peak_memory_gb() -> float:
    """Peak accelerator memory of this rank in GiB (host RSS peak on CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Trainer:
    """One rank's part of a run; `run()` goes through the phases and returns a summary dict."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        setup.check_layout(cfg, self.world)
        for role in ("actor", "critic"):           # before anything is built: name the field
            if getattr(cfg, role).layer_spec == "transformer_engine":
                try:
                    check_transformer_engine()
                except ValueError as err:
                    raise ConfigError(f"{role}.layer_spec = transformer_engine: {err}") from None
        self.sizes = derive_batch_sizes(cfg, self.world)
        self.out = Path(cfg.trainer.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        par = cfg.actor.parallel
        self.actor_pgs, self.layout = build_role_groups(par.tensor_parallel_size, par.pipeline_parallel_size)
        self.critic_pgs, _ = build_role_groups(par.tensor_parallel_size, par.pipeline_parallel_size)
        # the ranks that report a replica's metrics: every tensor they need lives on them
        reporter = self.layout.tp_rank == 0 and self.layout.is_last_stage
        flags: list[Any] = [None] * self.world
        dist.all_gather_object(flags, reporter)
        self.reporters = [r for r, f in enumerate(flags) if f]
        self.is_reporter = reporter
        self.report_group = dist.new_group(self.reporters)
        self.log_rank = self.reporters[0]
        self.rollout_tp = cfg.rollout.tensor_parallel_size
        self.replica, self.replicas = self.rank // self.rollout_tp, self.world // self.rollout_tp
        self.model_dir = setup.initial_model_dir(cfg, self.out)
        self.hf_config = setup.read_hf_config(self.model_dir)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.train_set, self.eval_sets = setup.load_prompt_sets(cfg, self.tokenizer)
        self.order = PromptOrder(len(self.train_set.prompt_ids), seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)
        self.max_tokens_per_mb = cfg.batch.micro_batch_size * (cfg.rollout.max_prompt_tokens
                                                               + cfg.rollout.max_response_tokens)
        self.actor = self._policy_engine(cfg.actor.optim, cfg.trainer.num_steps * self.sizes.mini_batches_per_step
                                         * cfg.algo.ppo_epochs)
        # no critic for an estimator without a value model (GRPO): every use below checks for None
        self.critic = ValueEngine(self.hf_config if cfg.critic.model_path is None
                                  else setup.read_hf_config(Path(cfg.critic.model_path)),
                                  self.critic_pgs, self.layout, optim=cfg.critic.optim,
                                  max_tokens_per_micro_batch=self.max_tokens_per_mb,
                                  attention_backend=LAYER_SPEC_BACKENDS[cfg.critic.layer_spec],
                                  params_dtype=getattr(torch, cfg.critic.params_dtype),
                                  **self._parallel_options(cfg.critic.parallel)) if needs_critic(cfg.algo) else None
        self.checkpoints = RunCheckpoints(cfg, self.ckpt_root, actor=self.actor, actor_pgs=self.actor_pgs,
                                          actor_hf_config=self.hf_config, model_dir=self.model_dir,
                                          critic=self.critic, critic_pgs=self.critic_pgs, say=self._print)
        self.writer = MetricWriter(self.out / "tensorboard", enabled=self.rank == self.log_rank)
        self.writer.run_settings(cfg, [f"eval/{h.name}/avg@{cfg.trainer.eval_samples}"           # HParams
                                       for h in self.eval_sets])
        self.rollout: RolloutEngine | None = None
        self.colocation: Colocation | None = None
        self.state: dict[str, Any] = {"phase": "sft", "phase_step": 0, "actor_step": None,
                                      "ev_best": None, "ev_since": 0}
        self.summary: dict[str, Any] = {}

    # ---- building blocks -------------------------------------------------------------------
    def _policy_engine(self, optim: Any, total_steps: int) -> PolicyEngine:
        return PolicyEngine(self.hf_config, self.actor_pgs, self.layout, optim=optim,
                            max_tokens_per_micro_batch=self.max_tokens_per_mb, total_steps=max(total_steps, 1),
                            attention_backend=LAYER_SPEC_BACKENDS[self.cfg.actor.layer_spec],
                            params_dtype=getattr(torch, self.cfg.actor.params_dtype),
                            **self._parallel_options(self.cfg.actor.parallel))

    def _describe_parallel(self) -> str:
        """Each role's sequence parallelism and activation recompute (one line), then its layer spec
        and data-parallel overlap (one line), as the engines run (a run without a critic: the actor's)."""
        on = {True: "on", False: "off"}
        roles = [(role, engine.core) for role, engine in (("actor", self.actor), ("critic", self.critic))
                 if engine is not None]
        parts = [f"{role}: sequence parallel {on[core.config.sequence_parallel]}, activation "
                 f"recompute {core.config.recompute_granularity or 'none'}" for role, core in roles]
        ddp = [f"{role}: layer spec {core.layer_spec}, grad-reduce overlap {on[core.ddp_config.overlap_grad_reduce]}, param-gather overlap "
               f"{on[core.ddp_config.overlap_param_gather]}, gradients reduced in "
               f"{'fp32' if core.ddp_config.grad_reduce_in_fp32 else 'params_dtype'}" for role, core in roles]
        return "; ".join(parts) + "\n" + "; ".join(ddp)

    def _parallel_options(self, parallel: Any) -> dict[str, Any]:
        """A role's engine options from its `parallel` section (the layout itself is in self.layout)."""
        return dict(sequence_parallel=parallel.sequence_parallel,
                    recompute_activations=parallel.recompute_activations, seed=self.cfg.trainer.seed,
                    overlap_grad_reduce=parallel.overlap_grad_reduce,
                    overlap_param_gather=parallel.overlap_param_gather,
                    ddp_bucket_size=parallel.ddp_bucket_size, grad_reduce_in_fp32=parallel.grad_reduce_in_fp32)

    def _print(self, text: str) -> None:
        if self.rank == self.log_rank:
            print(text, flush=True)

    def _actor_hf_buckets(self):
        return hf_weight_buckets([self.actor.core.model], self.hf_config,
                                 bucket_bytes=self.cfg.rollout.sync_bucket_bytes,
                                 tp_group=self.actor_pgs.tp, pp_group=self.actor_pgs.pp)

    def _sync_rollout(self) -> float:
        """Push the actor's weights into this rank's vLLM engine (waking it first); seconds taken."""
        assert self.rollout is not None and self.colocation is not None
        return self.colocation.sync(lambda: sync_to_rollout(self.rollout, self._actor_hf_buckets()))

    def _init_critic_from_policy(self) -> None:
        """VC-PPO: the critic starts from the (SFT) policy's trunk, value head zero."""
        if self.critic is None:
            return
        if self.cfg.critic.model_path is not None:
            self.critic.load_hf_dir(self.cfg.critic.model_path, init_from=self.cfg.critic.init_from)
            return
        # streamed: every rank keeps only its stage's tensors, each until its parameters are loaded
        self.critic.load_hf_stream(iter_bucket_tensors(self._actor_hf_buckets()))

    # ---- checkpoints (trainer/checkpointing.py) ----------------------------------------------
    def _save(self, global_step: int, *, actor: bool) -> None:
        """Checkpoint the critic (and the actor when `actor`) with the training state."""
        actor = actor or self.critic is None          # no critic: the actor's checkpoint holds the state
        if actor:
            self.state["actor_step"] = global_step
        state = dict(self.state, global_step=global_step, data=self.order.state_dict(), summary=self.summary)
        self.checkpoints.save(global_step, state, actor=actor)

    def _resume(self) -> bool:
        """Continue from the newest checkpoint pair under output_dir that reads; False when there is none."""
        found = self.checkpoints.resume()
        if found is None:
            return False
        state, critic_dir, actor_dir = found
        self.order.load_state_dict(state["data"])
        self.summary = dict(state["summary"])
        self.state = {k: state[k] for k in ("phase", "phase_step", "actor_step", "ev_best", "ev_since")}
        self._print(f"== resumed from {critic_dir or actor_dir}"
                    f"{'' if critic_dir is None else f' (actor {actor_dir.name})'}: phase {self.state['phase']}, "
                    f"{self.state['phase_step']} steps done")
        return True

    # ---- phase 0: SFT cold start -----------------------------------------------------------
    def _sft(self) -> None:
        cfg, steps = self.cfg, self.cfg.trainer.sft_steps
        sft = self._policy_engine(dataclasses.replace(cfg.actor.optim, lr=cfg.trainer.sft_lr), steps)
        sft.load_hf_dir(self.model_dir)
        progress = ProgressLine("sft", steps)
        dp, dp_rank = self.layout.dp, self.layout.dp_rank
        for step in range(steps):
            examples = setup.sft_examples(cfg, step, self.tokenizer)
            mine = examples[dp_rank::dp]
            width = max(len(p) + len(s) for p, s in mine)
            ids = torch.full((len(mine), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attn = torch.zeros(len(mine), width, dtype=torch.long)
            mask = torch.zeros(len(mine), width)
            for i, (p, s) in enumerate(mine):
                ids[i, :len(p) + len(s)] = torch.tensor(p + s)
                attn[i, :len(p) + len(s)] = 1
                mask[i, len(p):len(p) + len(s)] = 1.0
            tokens = mask.sum().reshape(1)
            dist.all_reduce(tokens, group=self.actor_pgs.dp)
            total = float(tokens)

            def nll(outs, mb, total=total):
                loss = -(outs["log_probs"] * mb["loss_mask"]).sum() / total
                return loss, {"loss": loss.detach()}

            sft.zero_grad()
            with sft.train_mode():
                res = sft.forward_backward({"input_ids": ids, "attention_mask": attn, "loss_mask": mask}, nll)
            sft.step()
            acc = MetricAccumulator()
            if self.is_reporter:
                acc.add_shares(res["metrics"])
                m = acc.reduce(self.report_group)
                self.writer.scalars("sft", m, step)
                if self.rank == self.log_rank and ((step + 1) % 10 == 0 or step + 1 == steps):
                    print(f"{progress.format(step, {})}  loss {m['loss']:.4f}", flush=True)
        sft.core.gather_params()                 # with overlap_param_gather: whole parameters first
        self.actor.core.raw_model.load_state_dict(sft.core.raw_model.state_dict())
        self.actor.core.optimizer.reload_model_params()
        del sft

    # ---- one step of value pretraining or RL -------------------------------------------------
    def _step_seed(self, phase: str, step: int) -> int:
        offset = {"value_pretrain": 1, "rl": 2}[phase]
        return (self.cfg.trainer.seed * 1_000_003 + offset * 10_000_019 + step * 65_537) % (2**31 - 1)

    def _checks_logprobs(self, step: int) -> bool:
        """Whether RL step `step` asks vLLM for its log-probs (rollout.logprob_check_interval)."""
        every = self.cfg.rollout.logprob_check_interval
        return every > 0 and step % every == 0

    def _rl_step(self, phase: str, step: int) -> dict[str, float]:
        cfg, algo = self.cfg, self.cfg.algo
        train_actor = phase == "rl"
        times: dict[str, float] = {}
        t_step = t = time.perf_counter()
        indices = self.order.next_indices(cfg.batch.global_prompts_per_step)
        share = len(indices) // self.replicas
        mine = indices[self.replica * share:(self.replica + 1) * share]
        seed = self._step_seed(phase, step) + self.replica * 7_919
        leader = self.rank % self.rollout_tp == 0        # a rollout TP group samples the same rows
        with self.colocation.generating():
            samples = sample_and_score(self.rollout, [self.train_set.prompt_ids[i] for i in mine],
                                       [self.train_set.answers[i] for i in mine], self.tokenizer,
                                       samples_per_prompt=cfg.batch.samples_per_prompt, seed=seed,
                                       reward_cfg=cfg.reward, verify=leader,
                                       logprobs=train_actor and self._checks_logprobs(step))
        self.colocation.after_rollout(weights_change=train_actor)
        times["rollout"] = time.perf_counter() - t
        samples = gather_samples(samples, self.actor_pgs.mp, leader)
        # per-token tensors live on the engines' device from here to the losses (GAE included)
        exp = build_experience(samples, self.tokenizer.pad_token_id).to(self.actor.core.device)
        batch = {"input_ids": exp.input_ids, "attention_mask": exp.attention_mask}
        t = time.perf_counter()
        values = None
        if self.critic is not None:
            with self.critic.eval_mode():
                values = values_of_tokens(self.critic.forward_backward(batch, None, True)["outputs"]["values"])
        if train_actor:
            with self.actor.eval_mode():
                old_lp = self.actor.forward_backward(batch, None, True)["outputs"]["log_probs"]
            exp.actor_log_probs = old_lp            # for rollout/logprob_abs_diff (vLLM vs actor)
        times["values"] = time.perf_counter() - t
        t = time.perf_counter()
        resp_mask = exp.response_mask()
        values_r = None if values is None else exp.to_response(values)
        # algo.advantage_estimator: GAE (λ = 1 targets in value pretraining) or GRPO; whitening
        adv_r, ret_r = compute_advantages(algo, token_rewards=exp.token_rewards(), values=values_r,
                                          response_mask=resp_mask, group_ids=torch.tensor(samples.prompt_index),
                                          value_pretrain=not train_actor, group=self.actor_pgs.dp)
        times["gae"] = time.perf_counter() - t
        batch.update(loss_mask=exp.loss_mask, is_positive=exp.rewards > 0)
        if self.critic is not None:
            batch.update(old_values=exp.to_full(values_r), returns=exp.to_full(ret_r))
        mini = self.sizes.mini_batches_per_step
        results: dict[str, UpdateResult] = {}
        if train_actor:
            t = time.perf_counter()
            actor_batch = dict(batch, old_log_probs=old_lp * exp.loss_mask, advantages=exp.to_full(adv_r))
            gen = torch.Generator().manual_seed(self._step_seed(phase, step) + 1)
            self.colocation.updating("actor")
            results["actor"] = ppo_update(self.actor, actor_batch, lambda c: actor_loss_fn(algo, c),
                                          epochs=algo.ppo_epochs, mini_batches=mini, generator=gen,
                                          dp_group=self.actor_pgs.dp)
            times["actor_update"] = time.perf_counter() - t
        if self.critic is not None:
            t = time.perf_counter()
            gen = torch.Generator().manual_seed(self._step_seed(phase, step) + 2)
            self.colocation.updating("critic")
            results["critic"] = ppo_update(self.critic, batch, lambda c: critic_loss_fn(algo, c),
                                           epochs=algo.ppo_epochs, mini_batches=mini, generator=gen,
                                           dp_group=self.critic_pgs.dp)
            times["critic_update"] = time.perf_counter() - t
        if train_actor:
            times["weight_sync"] = self._sync_rollout()
        else:
            self.colocation.wake()
        times["step"] = time.perf_counter() - t_step
        return self._step_metrics(phase, step, exp, values_r, ret_r, adv_r, resp_mask, results, times)

    def _step_metrics(self, phase, step, exp, values_r, ret_r, adv_r, resp_mask, results, times):
        """Global metrics of the step (reduced over the reporting ranks), written by the log rank."""
        if not self.is_reporter:
            return {}
        acc = MetricAccumulator()
        positions = PositionStats(self.cfg.trainer.position_bucket_size, self.cfg.trainer.position_num_buckets)
        n = float(len(exp.rewards))
        lengths = exp.response_lens.double().cpu()       # per-token tensors are reduced, not copied
        tokens = float((exp.prompt_lens + exp.response_lens).sum())
        acc.add_shares({"reward/mean": exp.rewards.double().sum() / n,
                        "reward/accuracy": (exp.rewards > 0).double().sum() / n,
                        "response_length/truncated_frac": exp.truncated.double().sum() / n,
                        "perf/tokens": torch.tensor(tokens, dtype=torch.float64)})
        acc.add_stats("response_length", lengths[:, None], torch.ones(len(lengths), 1))
        if values_r is not None:                               # a critic (GRPO has none)
            acc.add_stats("critic/values", values_r, resp_mask)
            acc.add_stats("critic/returns", ret_r, resp_mask)
            acc.add_explained_variance("critic/explained_variance", values_r, ret_r, resp_mask)
            positions.add("values", values_r, resp_mask)
            positions.add("returns", ret_r, resp_mask)
        if phase == "rl":
            acc.add_stats("actor/advantages", adv_r, resp_mask)
            lp_diff = logprob_abs_diff(exp)
            if lp_diff is not None:
                acc.add_stats("rollout/logprob_abs_diff", lp_diff, resp_mask)
            positions.add("advantages", adv_r, resp_mask)
        for res in results.values():
            acc.add_shares({k: torch.tensor(v, dtype=torch.float64) for k, v in res.shares.items()})
        # shares are per replica: the sums over replicas of reward/... are replica means summed
        m = acc.reduce(self.report_group)
        replicas = float(len(self.reporters))
        for k in ("reward/mean", "reward/accuracy", "response_length/truncated_frac"):
            m[k] /= replicas
        tokens_total = m.pop("perf/tokens")
        for role, res in results.items():
            m[f"{role}/grad_norm"], m[f"{role}/lr"] = res.grad_norm, res.lr
        m.update({f"time/{k}_s": v for k, v in times.items()})
        m["perf/tokens_per_s"] = tokens_total / max(times["step"], 1e-9)
        m["perf/peak_memory_gb"] = _peak_memory_gb()
        pos = positions.reduce(self.report_group)
        self.writer.scalars(phase, m, step)
        self.writer.position_view(phase, pos, self.cfg.trainer.position_bucket_size, step)
        self.writer.histogram(phase, "response_length/histogram", lengths.numpy(), step)
        return m

    # ---- evaluation ------------------------------------------------------------------------
    def _gather_counts(self, local: list[int]) -> list[int]:
        """Concatenate per-replica lists (leaders of rollout replicas contribute) over all ranks."""
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, local if self.rank % self.rollout_tp == 0 else None)
        return [x for p in parts if p is not None for x in p]

    @property
    def _num_held_out(self) -> int:
        return sum(len(h.prompt_ids) for h in self.eval_sets)

    def _score_held_out(self, samples: int, seed: int, greedy: bool) -> list[list[tuple[int, int, int, int]]]:
        """Per held-out set, per problem: (correct, samples, tokens, truncated); replicas score shares."""
        ids = [p for held in self.eval_sets for p in held.prompt_ids]
        answers = [a for held in self.eval_sets for a in held.answers]
        mine = list(range(self.replica, len(ids), self.replicas))
        with self.colocation.generating():
            s = sample_and_score(self.rollout, [ids[i] for i in mine], [answers[i] for i in mine], self.tokenizer,
                                 samples_per_prompt=samples, seed=seed, reward_cfg=self.cfg.reward, greedy=greedy)
        local = per_problem(s.prompt_index, s.rewards, [len(r) for r in s.response_ids], s.truncated, len(mine))
        return split_by_set(self._gather_counts(local), [len(h.prompt_ids) for h in self.eval_sets], self.replicas)

    def _greedy_accuracy(self, step: int) -> float:
        """Greedy accuracy of each held-out set (`eval/<set>/accuracy`) and over all sets
        (`eval/accuracy`) at RL step `step`; returns the latter."""
        per_set = self._score_held_out(1, 0, greedy=True)
        m = {f"{h.name}/accuracy": sum(p[0] for p in rows) / len(rows) for h, rows in zip(self.eval_sets, per_set)}
        m["accuracy"] = sum(p[0] for rows in per_set for p in rows) / sum(len(rows) for rows in per_set)
        self.writer.scalars("eval", m, step)
        if len(per_set) > 1:
            self._print(f"== greedy accuracy at RL step {step}: "
                        + ", ".join(f"{h.name} {m[h.name + '/accuracy']:.3f} ({len(h.prompt_ids)} problems)"
                                    for h in self.eval_sets))
        return m["accuracy"]

    def _sampled_eval(self, step: int) -> dict[str, float]:
        """avg@k and pass@k on each held-out set (top-p / temperature of trainer.eval_*)."""
        tc, n = self.cfg.trainer, self.cfg.trainer.eval_samples
        t = time.perf_counter()
        with sampling(self.rollout, tc.eval_temperature, tc.eval_top_p):
            per_set = self._score_held_out(n, self._step_seed("rl", step) + 17, greedy=False)
        m: dict[str, float] = {}
        for held, rows in zip(self.eval_sets, per_set):
            m.update(held_out_metrics(held.name, rows, n))
        m["time/eval_s"] = time.perf_counter() - t
        self.writer.scalars("eval", m, step)
        return m

    def _ev_plateaued(self, m: dict[str, float]) -> bool:
        """Track the best explained variance of value pretraining; True once it stopped improving."""
        tc = self.cfg.trainer
        box: list[Any] = [None]
        if self.rank == self.log_rank:
            best, since = self.state["ev_best"], self.state["ev_since"]
            ev = m["critic/explained_variance"] if "critic/explained_variance" in m else None
            if ev is not None and (best is None or ev > best + tc.value_pretrain_min_delta):
                best, since = ev, 0
            else:
                since += 1
            box = [(best, since)]
        dist.broadcast_object_list(box, src=self.log_rank)      # every rank stops at the same step
        self.state["ev_best"], self.state["ev_since"] = box[0]
        return self.state["ev_since"] >= tc.value_pretrain_patience

    # ---- the run ---------------------------------------------------------------------------
    def _phase_loop(self, phase: str, steps: int, request: CheckpointRequest, offset: int) -> bool:
        """Run `phase` from its saved step; False if a signal stopped it (checkpoint written)."""
        progress = ProgressLine(phase, steps)
        tc = self.cfg.trainer
        while self.state["phase_step"] < steps:
            step = self.state["phase_step"]
            m = self._rl_step(phase, step)
            self.state["phase_step"] = step + 1
            if self.rank == self.log_rank:
                progress.step(step, m)
            if phase == "value_pretrain" and tc.value_pretrain_patience and self._ev_plateaued(m):
                self._print(f"== explained variance has not improved by {tc.value_pretrain_min_delta} for "
                            f"{tc.value_pretrain_patience} steps (best {self.state['ev_best']}): value "
                            f"pretraining stops after {step + 1} of {steps} steps")
                break
            if phase == "rl" and tc.eval_every_steps and (step + 1) % tc.eval_every_steps == 0 \
                    and step + 1 < steps:
                self._greedy_accuracy(step + 1)          # accuracy over steps: greedy, avg@k, pass@k
                self._sampled_eval(step + 1)
            stop = request.requested(dist.group.WORLD)
            if stop or ((step + 1) % tc.checkpoint_interval == 0 and step + 1 < steps):  # the end saves too
                self._save(offset + step + 1, actor=phase == "rl")
            if stop:
                self._print(f"== {request.received.name if request.received else 'signal'}: checkpoint "
                            f"written; exiting so the job can be requeued and resumed")
                return False
        return True

    def run(self) -> dict[str, Any]:
        """All phases from the latest checkpoint (or the start); returns the summary."""
        cfg, tc = self.cfg, self.cfg.trainer
        self._print(f"== vcppo_megatron trainer: {self.world} ranks, actor/critic TP={self.layout.tp} "
                    f"PP={self.layout.pp} DP={self.layout.dp}, rollout TP={self.rollout_tp}\n"
                    f"{self._describe_parallel()}\n{self.sizes.describe()}")
        t0 = time.perf_counter()
        resumed = self._resume()
        if not resumed:
            self.actor.load_hf_dir(self.model_dir)
        with CheckpointRequest() as request:
            if self.state["phase"] == "sft":
                if tc.sft_steps:
                    self._sft()
                self._init_critic_from_policy()
                self.state.update(phase="value_pretrain", phase_step=0)
                if tc.value_checkpoint is not None:
                    self.checkpoints.load_value(tc.value_checkpoint)
                    self.state["phase"] = "rl"
                self._save(0, actor=True)
            # start-up order (memory timeline): the engines release their gradients and optimizer
            # state, then vLLM starts beside their weights with a KV cache sized by the plan
            rollout_cfg, vllm_share, line = rollout_memory(cfg, self.hf_config, self.world)
            if line:
                self._print(line)
            self.colocation = Colocation(Timeline.from_config(cfg), {"actor": self.actor, "critic": self.critic})
            self.rollout = self.colocation.start_rollout(lambda: RolloutEngine(
                self.model_dir, rollout_cfg, seed=tc.seed, pad_token_id=self.tokenizer.pad_token_id,
                enable_sleep_mode=cfg.rollout.sleep_level > 0, gpu_memory_fraction=vllm_share))
            self._sync_rollout()
            if self.state["phase"] == "value_pretrain":
                if tc.value_pretrain_steps and not self._phase_loop("value_pretrain", tc.value_pretrain_steps,
                                                                    request, 0):
                    return {"stopped": True}
                self.state.update(phase="rl", phase_step=0)
                self._save(tc.value_pretrain_steps, actor=False)
            if self.state["phase"] == "rl":
                if self.state["phase_step"] == 0 and "accuracy_before" not in self.summary:
                    self.summary["accuracy_before"] = self._greedy_accuracy(0)
                    self._print(f"== greedy accuracy before RL: {self.summary['accuracy_before']:.3f} "
                                f"on {self._num_held_out} held-out problems")
                if tc.num_steps and not self._phase_loop("rl", tc.num_steps, request, tc.value_pretrain_steps):
                    return {"stopped": True}
                self.state.update(phase="done", phase_step=0)
                self._save(tc.value_pretrain_steps + tc.num_steps, actor=True)
        self.summary["accuracy_after"] = self._greedy_accuracy(tc.num_steps)
        final = self._sampled_eval(tc.num_steps)
        self.writer.close()
        self.summary.update(final_eval=final, wall_time_s=time.perf_counter() - t0,
                            tensorboard=str(self.out / "tensorboard"), checkpoints=str(self.ckpt_root))
        before = self.summary.get("accuracy_before", float("nan"))
        self._print(f"== greedy accuracy on {self._num_held_out} held-out problems: before RL "
                    f"{before:.3f} -> after RL {self.summary['accuracy_after']:.3f}\n"
                    + "".join(f"   {k} {v:.3f}\n" for k, v in final.items() if not k.startswith("time/"))
                    + f"== wall time {self.summary['wall_time_s']:.0f}s; TensorBoard logs: {self.out / 'tensorboard'}"
                    f"; checkpoints: {self.ckpt_root}")
        sys.stdout.flush()
        return self.summary
