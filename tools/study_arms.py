"""The papers' ablation studies as overrides on ONE base recipe (tools/reproduce.py runs them).

Every arm of every study is a list of dotted overrides of the base recipe (examples/tiny_cot_cpu.yaml,
the VC-PPO settings of examples/vcppo.yaml on the long chain task); nothing is tuned per arm. Arms
whose resolved settings are identical (e.g. VC-PPO in Table 2, value pretraining 1x in Table 3 and
λ_actor = 0.95 in Table 4) share one run: `settings_key` hashes the resolved config.

Mapping to the papers (VC-PPO arXiv 2503.01491 §4; VAPO arXiv 2504.05118 §5.1):
- VC-PPO Table 2. GRPO: `algo.advantage_estimator=grpo`, no critic. PPO: critic from the trained
  reward model, λ_actor = λ_critic = 0.95, no value pretraining (§4.1 "RL Baseline"). VC-PPO w/o
  Decoupled-GAE: value pretraining, then λ_actor = λ_critic = 1.0: the paper's row equals its
  Table 4 λ_actor = 1.0 row on AIME pass@1 / pass@32 / GPQA (29.4 / 66.7 / 46.9), so it is that
  run (λ_critic stays 1, the coupled λ is 1). VC-PPO: the base recipe (value pretraining, λ_actor
  0.95, λ_critic 1).
- VC-PPO Table 3: value pretraining for 0.5x, 1x, 1.5x the recipe's length (paper: 50 / 100 / 150
  steps, 100 the recipe's choice).
- VC-PPO Table 4: λ_actor ∈ {0.9, 0.95, 0.99, 1.0} with λ_critic = 1.
- VAPO Table 1: VAPO = base + the seven changes of §5.1 (critic from the reward model warmed up for
  the recipe's value-pretraining length, λ_critic = 1, length-adaptive λ_actor with α = 0.05,
  ε_high = 0.28, token-level loss, positive-example NLL μ = 0.1, group sampling); each "w/o" arm
  reverts one change to basic PPO's setting; Vanilla PPO is the Table 2 PPO arm.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE_RECIPE = ROOT / "examples" / "tiny_cot_cpu.yaml"

# Fields that say where a run lives or which seed it is: not part of an arm's settings.
LOCATION_FIELDS = ("trainer.output_dir", "trainer.seed", "actor.model_path", "critic.model_path",
                   "reward_model.output_dir")

# --task: the task every stage of a study runs (its overrides of the base recipe, which runs
# chain_sums). chain_sums_graded's pace tag makes the prompt one token longer, and its SFT cold
# start needs twice the steps: after the recipe's 1200 the policy still miscopies terms (greedy
# 0.270, paces barely apart); after 2400, greedy 0.992, sampled 0.475 (x 0.80, y 0.44, z 0.20),
# value ceiling 0.23 (data/chain_sums.py; measured on seed 1234 before any study ran on the task).
DEFAULT_TASK = "chain_sums"         # the base recipe's task: runs/reproduce, docs/REPRODUCTION.md
TASK_OVERRIDES = {
    "chain_sums": (),
    "chain_sums_graded": ("data.task=chain_sums_graded", "rollout.max_prompt_tokens=38", "trainer.sft_steps=2400"),
}


def task_suffix(task: str) -> str:
    """What a task's runs directory and report name carry after the default's ('' for DEFAULT_TASK)."""
    return "" if task == DEFAULT_TASK else f"_{task}"

# --smoke: every stage tiny (the short `sums` task: 7-14-token responses; 2 RL steps; few SFT
# steps). It tests the runner, not the result.
SMOKE_OVERRIDES = (
    "data.task=sums", "rollout.max_prompt_tokens=32", "rollout.max_response_tokens=24",
    "tiny_model.hidden_size=64", "tiny_model.num_attention_heads=2", "tiny_model.ffn_hidden_size=128",
    "tiny_model.max_position_embeddings=128",
    "trainer.sft_steps=60", "trainer.sft_lr=3.0e-3", "batch.global_sft_batch_size=16",
    "batch.global_prompts_per_step=4", "batch.samples_per_prompt=2", "batch.global_mini_batch_size=8",
    "batch.micro_batch_size=4", "trainer.value_pretrain_steps=2", "trainer.num_steps=2",
    "trainer.eval_problems=8", "trainer.eval_samples=2", "trainer.eval_every_steps=1",
    "trainer.checkpoint_interval=100", "trainer.position_bucket_size=4", "trainer.position_num_buckets=4",
    "reward_model.train_prompts=16", "reward_model.eval_prompts=16", "reward_model.samples_per_prompt=2",
    "reward_model.epochs=1", "reward_model.batch_size=16",
)


@dataclass(frozen=True)
class Arm:
    """One row of a paper's table: its overrides of the base recipe."""

    name: str
    overrides: tuple[str, ...] = ()
    reward_model: bool = False      # the critic starts from the seed's trained reward model
    note: str = ""


@dataclass(frozen=True)
class Study:
    """One table of a paper: its arms, the paper's figures for them, and the column they report."""

    name: str
    title: str
    arms: tuple[Arm, ...]
    paper_metric: str
    paper_values: dict[str, str] = field(default_factory=dict)


STUDY_NAMES = ("vcppo-table2", "vcppo-table3", "vcppo-table4", "vapo-table1")

# VAPO §5.1: the change of each technique and basic PPO's setting its "w/o" arm reverts to.
# (name, VAPO's overrides, the w/o arm's overrides or None when the change has no config switch)
NO_SWITCH = "no config switch"


def _ppo() -> Arm:
    return Arm("PPO", ("critic.init_from=reward_model", "algo.lam_actor=0.95", "algo.lam_critic=0.95",
                       "trainer.value_pretrain_steps=0"), reward_model=True,
               note="critic from the trained reward model, λ = 0.95 for actor and critic, no value pretraining")


def build_studies(base: Any) -> dict[str, Study]:
    """The four studies as arms over `base` (the resolved base Config: lengths scale with it)."""
    vp = base.trainer.value_pretrain_steps
    batch = base.batch
    prompts, samples = batch.global_prompts_per_step, batch.samples_per_prompt
    table2 = Study("vcppo-table2", "VC-PPO Table 2: ablation of VC-PPO's components", (
        Arm("GRPO", ("algo.advantage_estimator=grpo", "trainer.value_pretrain_steps=0"),
            note="outcome reward normalised within each prompt's group; no critic"),
        _ppo(),
        Arm("VC-PPO w/o Decoupled-GAE", ("algo.lam_actor=1.0", "algo.lam_critic=1.0"),
            note="value pretraining, then one λ = 1.0 for actor and critic (the paper's row equals "
                 "its Table 4 λ_actor = 1.0 row)"),
        Arm("VC-PPO", (), note="the base recipe: value pretraining, λ_actor 0.95, λ_critic 1.0"),
    ), "AIME pass@1", {"GRPO": "35.8", "PPO": "5.6", "VC-PPO w/o Decoupled-GAE": "29.4", "VC-PPO": "41.9"})
    lengths = [(f, max(1, round(f * vp))) for f in (0.5, 1.0, 1.5)]
    table3 = Study("vcppo-table3", "VC-PPO Table 3: value-pretraining length", tuple(
        Arm(f"value pretraining {steps} steps ({f:g}x)", (f"trainer.value_pretrain_steps={steps}",),
            note=f"paper: {int(f * 100)} steps") for f, steps in lengths),
        "AIME pass@1", {f"value pretraining {s} steps ({f:g}x)": v
                        for (f, s), v in zip(lengths, ("20.6", "30.1", "25.1"))})
    table4 = Study("vcppo-table4", "VC-PPO Table 4: λ_actor with λ_critic = 1", tuple(
        Arm(f"λ_actor = {lam}", (f"algo.lam_actor={lam}", "algo.lam_critic=1.0")) for lam in (0.9, 0.95, 0.99, 1.0)),
        "AIME pass@1", {"λ_actor = 0.9": "34.3", "λ_actor = 0.95": "41.3", "λ_actor = 0.99": "41.9",
                        "λ_actor = 1.0": "29.4"})
    vapo_on = ("critic.init_from=reward_model", f"trainer.value_pretrain_steps={vp}", "algo.lam_critic=1.0",
               "algo.length_adaptive_alpha=0.05", "algo.eps_high=0.28", "algo.eps_low=0.2",
               "algo.loss_agg_mode=token-mean", "algo.nll_coef=0.1",
               f"batch.global_prompts_per_step={prompts}", f"batch.samples_per_prompt={samples}")
    # each technique: the overrides that revert it to basic PPO (VAPO §5.1 "basic PPO")
    without = {
        "Value-Pretraining": ("trainer.value_pretrain_steps=0",),
        "Decoupled-GAE": ("algo.lam_critic=0.95",),
        "Length-adaptive GAE": ("algo.length_adaptive_alpha=null", "algo.lam_actor=0.95"),
        "Clip-Higher": ("algo.eps_high=0.2",),
        "Token-level Loss": ("algo.loss_agg_mode=seq-mean-token-mean",),
        "Positive Example LM Loss": ("algo.nll_coef=0.0",),
        "Group-Sampling": (f"batch.global_prompts_per_step={prompts * samples}", "batch.samples_per_prompt=1"),
    }
    notes = {
        "Decoupled-GAE": "value targets with basic PPO's λ = 0.95; the trainer has no switch for "
                         "value targets with the per-sequence length-adaptive λ (VAPO's coupled form)",
        "Group-Sampling": f"{prompts * samples} prompts x 1 sample instead of {prompts} x {samples} "
                          f"(same responses per step, same mini-batches)",
    }
    vapo_arms = [Arm("VAPO", vapo_on, reward_model=True,
                     note=f"critic from the reward model warmed up {vp} steps (the recipe's length; "
                          f"paper 50), λ_critic 1, α 0.05, ε_high 0.28, token-level loss, μ 0.1, "
                          f"{prompts} prompts x {samples} samples")]
    vapo_arms += [Arm(f"VAPO w/o {tech}", vapo_on + ov, reward_model=True, note=notes.get(tech, ""))
                  for tech, ov in without.items()]
    vapo_arms.append(Arm("Vanilla PPO", _ppo().overrides, reward_model=True, note="the Table 2 PPO arm"))
    vapo = Study("vapo-table1", "VAPO Table 1: ablation of VAPO's seven techniques", tuple(vapo_arms),
                 "AIME24 avg@32", {"Vanilla PPO": "5", "VAPO w/o Value-Pretraining": "11",
                                   "VAPO w/o Decoupled-GAE": "33", "VAPO w/o Length-adaptive GAE": "45",
                                   "VAPO w/o Clip-Higher": "46", "VAPO w/o Token-level Loss": "53",
                                   "VAPO w/o Positive Example LM Loss": "54", "VAPO w/o Group-Sampling": "55",
                                   "VAPO": "60"})
    return {s.name: s for s in (table2, table3, table4, vapo)}


def resolved_settings(recipe: Path, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The flattened config of `recipe` + `overrides`, without the location fields."""
    from vcppo_megatron.config import load_config
    from vcppo_megatron.logging.tensorboard import flatten_settings

    flat = flatten_settings(load_config(recipe, list(overrides)))
    return {k: v for k, v in flat.items() if k not in LOCATION_FIELDS}


def settings_key(settings: dict[str, Any], *parts: str) -> str:
    """A short stable hash of resolved settings (and of the stages they build on)."""
    blob = json.dumps([settings, list(parts)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class UniqueRun:
    """One run shared by every (study, arm) whose resolved settings are the same."""

    key: str
    overrides: tuple[str, ...]
    reward_model: bool
    members: list[tuple[str, str]]          # (study, arm name)
    settings: dict[str, Any]


def dedupe(recipe: Path, base_overrides: tuple[str, ...], studies: list[Study], sft_key: str,
           rm_key: str) -> list[UniqueRun]:
    """The distinct runs the selected studies need, in table order; identical settings run once.
    A run's key covers its resolved settings, the SFT stage's key and (if it uses one) the reward model's."""
    runs: dict[str, UniqueRun] = {}
    for study in studies:
        for arm in study.arms:
            overrides = tuple(base_overrides) + arm.overrides + ("trainer.sft_steps=0",)
            settings = {k: v for k, v in resolved_settings(recipe, overrides).items()
                        if not k.startswith("reward_model.")}        # the reward model's key covers these
            key = settings_key(settings, sft_key, rm_key if arm.reward_model else "no reward model")
            if key in runs:
                runs[key].members.append((study.name, arm.name))
            else:
                runs[key] = UniqueRun(key, overrides, arm.reward_model, [(study.name, arm.name)], settings)
    return list(runs.values())
