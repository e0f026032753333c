"""What a run is built from: checked layout, the initial HF model directory, data, engines.

Every rank runs the same code. Rank 0 writes files (the tiny model of the demo) and the others
wait at a barrier, so nothing here depends on a shared file system being fast.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vcppo_megatron.algorithms.advantages import needs_critic
from vcppo_megatron.config import ConfigError
from vcppo_megatron.config.schema import Config
from vcppo_megatron.data.chat_template import encode_prompt
from vcppo_megatron.data.prompts import load_problems
from vcppo_megatron.data.synthetic import synthetic_task

INIT_MODEL_DIR = "init_model"


def check_layout(cfg: Config, world_size: int) -> None:
    """Raise ConfigError for layouts this trainer does not run (each message names the field)."""
    a, c = cfg.actor.parallel, cfg.critic.parallel
    if (a.tensor_parallel_size, a.pipeline_parallel_size) != (c.tensor_parallel_size, c.pipeline_parallel_size):
        raise ConfigError(
            f"critic.parallel (TP={c.tensor_parallel_size}, PP={c.pipeline_parallel_size}) differs from "
            f"actor.parallel (TP={a.tensor_parallel_size}, PP={a.pipeline_parallel_size}): expected the "
            f"same tensor and pipeline sizes (both roles train on the same data-parallel rows)")
    for role, p in (("actor", a), ("critic", c)):
        if p.sequence_parallel and p.tensor_parallel_size == 1:
            raise ConfigError(f"{role}.parallel.sequence_parallel = true with tensor_parallel_size = 1: "
                              f"sequence parallelism splits tokens over the TP ranks; expected "
                              f"tensor_parallel_size > 1 or sequence_parallel = false")
    model_parallel = a.tensor_parallel_size * a.pipeline_parallel_size
    rollout_tp = cfg.rollout.tensor_parallel_size
    if model_parallel % rollout_tp:
        raise ConfigError(f"rollout.tensor_parallel_size = {rollout_tp}: expected a divisor of the actor's "
                          f"tensor x pipeline size {model_parallel} (a rollout replica lies inside one "
                          f"training replica)")
    replicas = world_size // rollout_tp
    if cfg.batch.global_prompts_per_step % replicas:
        raise ConfigError(f"batch.global_prompts_per_step = {cfg.batch.global_prompts_per_step}: expected a "
                          f"multiple of the {replicas} rollout replicas (world size / rollout.tensor_parallel_size)")
    _check_estimator(cfg)
    if needs_critic(cfg.algo) and cfg.critic.init_from == "reward_model" and cfg.critic.model_path is None:
        raise ConfigError("critic.init_from = 'reward_model' with critic.model_path = null: expected an HF "
                          "sequence-classification checkpoint with one label in critic.model_path")
    if cfg.algo.kl_coef > 0:
        raise ConfigError(f"algo.kl_coef = {cfg.algo.kl_coef}: this trainer keeps no reference policy; "
                          f"expected 0 (VC-PPO and VAPO train without a KL penalty)")
    if cfg.trainer.sft_steps > 0 and cfg.data.train_path is not None:
        raise ConfigError(f"trainer.sft_steps = {cfg.trainer.sft_steps} with data.train_path set: the SFT cold "
                          f"start needs chain-of-thought solutions, which only the synthetic task has; "
                          f"expected trainer.sft_steps = 0 (start from an SFT checkpoint in actor.model_path)")
    eval_paths(cfg)
    _check_synthetic_fits(cfg)


def _check_estimator(cfg: Config) -> None:
    """GRPO has no critic to pretrain and needs a group of samples per prompt."""
    if needs_critic(cfg.algo):
        return
    tc = cfg.trainer
    if tc.value_pretrain_steps or tc.value_checkpoint is not None:
        raise ConfigError(f"algo.advantage_estimator = 'grpo' with trainer.value_pretrain_steps = "
                          f"{tc.value_pretrain_steps} / trainer.value_checkpoint = {tc.value_checkpoint!r}: GRPO "
                          f"has no critic; expected value_pretrain_steps = 0 and value_checkpoint = null")
    if cfg.batch.samples_per_prompt < 2:
        raise ConfigError(f"algo.advantage_estimator = 'grpo' with batch.samples_per_prompt = "
                          f"{cfg.batch.samples_per_prompt}: the group baseline needs several samples of a prompt; expected >= 2")


def _check_synthetic_fits(cfg: Config) -> None:
    """The synthetic task's longest prompt and solution must fit the rollout limits."""
    if cfg.data.train_path is not None and cfg.data.eval_path is not None:
        return
    task, r = synthetic_task(cfg.data), cfg.rollout
    if task.max_prompt_tokens > r.max_prompt_tokens:
        raise ConfigError(f"rollout.max_prompt_tokens = {r.max_prompt_tokens}: the synthetic task's prompts "
                          f"({task.size_field}) take up to {task.max_prompt_tokens} tokens; "
                          f"expected at least that")
    if task.max_response_tokens > r.max_response_tokens:
        raise ConfigError(f"rollout.max_response_tokens = {r.max_response_tokens}: correct responses of the "
                          f"synthetic task ({task.size_field}) take up to "
                          f"{task.max_response_tokens} tokens; expected at least that")


def _tiny_model(cfg: Config, out: Path) -> None:
    """Write the random tiny Qwen2-style model and the synthetic task's tokenizer to `out`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = synthetic_task(cfg.data).build_tokenizer()
    t = cfg.tiny_model
    hf_config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_query_groups,
        intermediate_size=t.ffn_hidden_size, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.trainer.seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Qwen2ForCausalLM(hf_config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)


def initial_model_dir(cfg: Config, output_dir: Path) -> Path:
    """The actor's starting HF directory: `actor.model_path`, or the tiny model (built once by rank 0)."""
    if cfg.actor.model_path is not None:
        path = Path(cfg.actor.model_path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"actor.model_path = {str(path)!r}: expected an HF model directory with "
                              f"config.json (convert a Megatron checkpoint with tools/convert_megatron_to_hf.py)")
        return path
    path = output_dir / INIT_MODEL_DIR
    if dist.get_rank() == 0 and not (path / "config.json").is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        _tiny_model(cfg, path)
    dist.barrier()
    return path


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """config.json of an HF model directory as a dict."""
    return json.loads((model_dir / "config.json").read_text())


@dataclass
class PromptSet:
    """Encoded prompts and their answers."""

    name: str
    prompt_ids: list[list[int]]
    answers: list[str]
    problems: list[str]


def _synthetic_set(name: str, count: int, seed: int, cfg: Config, tokenizer: Any) -> PromptSet:
    """Synthetic problems, sent as bare text (the character tokenizer knows no template)."""
    problems = synthetic_task(cfg.data).make_problems(count, seed)
    return PromptSet(name, [encode_prompt(p.prompt, tokenizer, "none") for p in problems],
                     [p.answer for p in problems], [p.prompt for p in problems])


def _file_set(path: str, cfg: Config, tokenizer: Any, show_example: bool = False) -> PromptSet:
    """Problems of a jsonl / parquet file, formatted with `data.prompt_template`."""
    d = cfg.data
    rows, report = load_problems(path, problem_key=d.problem_key, answer_key=d.answer_key,
                                 answer_format=d.answer_format, on_bad_row=d.on_bad_row)
    prompts = [encode_prompt(r.problem, tokenizer, d.prompt_template) for r in rows]
    if dist.get_rank() == 0:
        print(report.summary(), flush=True)
        if show_example:        # what the model sees: the template, the instruction, the problem
            print(f"== example prompt ({rows[0].location}, {len(prompts[0])} tokens, data.prompt_template = "
                  f"{d.prompt_template}, answer {rows[0].answer!r}): {tokenizer.decode(prompts[0])!r}", flush=True)
    return PromptSet(Path(path).stem, prompts, [r.answer for r in rows], [r.problem for r in rows])


def eval_paths(cfg: Config) -> list[str]:
    """`data.eval_path` as a list of files (empty: the synthetic held-out set); names must differ."""
    paths = cfg.data.eval_path
    paths = [] if paths is None else [paths] if isinstance(paths, str) else list(paths)
    if cfg.data.eval_path is not None and not paths:
        raise ConfigError("data.eval_path = []: expected a file, a list of files, or null (synthetic held-out set)")
    names: dict[str, str] = {}
    for path in paths:
        name = Path(path).stem
        if name in names:
            raise ConfigError(f"data.eval_path: {names[name]!r} and {path!r} would both report as {name!r} "
                              f"(each held-out set is named by its file name without suffix): expected "
                              f"distinct file names")
        names[name] = path
    return paths


def load_prompt_sets(cfg: Config, tokenizer: Any) -> tuple[PromptSet, list[PromptSet]]:
    """(training prompts, held-out sets): from data files, or the synthetic task (seeded)."""
    d, seed = cfg.data, cfg.trainer.seed
    train = (_synthetic_set("synthetic", d.synthetic_problems, seed * 7 + 3, cfg, tokenizer) if d.train_path is None
             else _file_set(d.train_path, cfg, tokenizer, show_example=True))
    paths = eval_paths(cfg)
    held = ([_file_set(p, cfg, tokenizer) for p in paths] if paths else
            [_synthetic_set("synthetic_eval", cfg.trainer.eval_problems, seed + 1, cfg, tokenizer)])
    return train, held


def sft_examples(cfg: Config, step: int, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """The global SFT batch of `step`: (prompt ids, solution ids + end-of-sequence) pairs."""
    problems = synthetic_task(cfg.data).make_demonstrations(cfg.batch.global_sft_batch_size,
                                                           cfg.trainer.seed * 7919 + step)
    return [(tokenizer(p.prompt, add_special_tokens=False)["input_ids"],
             tokenizer(p.demonstration(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            for p in problems]
