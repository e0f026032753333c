"""The built-in synthetic tasks: sums of 1..N digits and the long chain_sums task, their token
bounds, and the trainer's check that the rollout limits fit them."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from vcppo_megatron.config import ConfigError, load_config
from vcppo_megatron.data.synthetic import build_tokenizer, make_problems, prompt_tokens, response_tokens
from vcppo_megatron.trainer.setup import check_layout

ROOT_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RECIPE = ROOT_EXAMPLES / "tiny_cpu.yaml"


@pytest.mark.parametrize("max_operands", [1, 2, 4, 7])
def test_problems_are_sums_of_one_to_n_digits_within_the_token_bounds(max_operands):
    problems = make_problems(2000, seed=11, max_operands=max_operands)
    assert problems == make_problems(2000, seed=11, max_operands=max_operands)      # reproducible
    assert problems != make_problems(2000, seed=12, max_operands=max_operands)
    counts = Counter()
    tokenizer = build_tokenizer()
    longest_prompt = longest_response = 0
    for p in problems:
        assert p.prompt.endswith("=")
        terms = p.prompt[:-1].split("+")
        assert all(len(t) == 1 and t.isdigit() for t in terms), p.prompt
        assert p.answer == str(sum(int(t) for t in terms))
        assert p.solution() == f"<think>{p.prompt[:-1]}</think>\\boxed{{{p.answer}}}"
        counts[len(terms)] += 1
        longest_prompt = max(longest_prompt, len(tokenizer(p.prompt, add_special_tokens=False)["input_ids"]))
        solution = tokenizer(p.solution(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        longest_response = max(longest_response, len(solution))
        assert tokenizer.decode(solution[:-1]) == p.solution()
    assert sorted(counts) == list(range(1, max_operands + 1))                   # every length occurs
    assert min(counts.values()) > 2000 / max_operands * 0.8                     # about uniformly
    assert longest_prompt == prompt_tokens(max_operands)                        # the bounds are tight
    assert longest_response <= response_tokens(max_operands)
    if max_operands >= 2:                                                       # two-digit sums occur
        assert longest_response == response_tokens(max_operands)


def test_bad_operand_count_is_rejected():
    with pytest.raises(ValueError, match="max_operands = 0"):
        make_problems(3, seed=0, max_operands=0)
    with pytest.raises(ConfigError, match="data.synthetic_max_operands"):
        load_config(RECIPE, ["data.synthetic_max_operands=0"])


@pytest.mark.parametrize("overrides, field", [
    (["rollout.max_response_tokens=13"], "rollout.max_response_tokens = 13"),
    (["data.synthetic_max_operands=10"], "rollout.max_response_tokens = 24"),
    (["rollout.max_prompt_tokens=7"], "rollout.max_prompt_tokens = 7"),
])
def test_trainer_rejects_rollout_limits_too_small_for_the_synthetic_task(overrides, field):
    check_layout(load_config(RECIPE), world_size=2)                             # the demo fits
    with pytest.raises(ConfigError, match=field):
        check_layout(load_config(RECIPE, overrides), world_size=2)


# ---- chain_sums: the long chain-of-thought task ------------------------------------------------

def test_chain_sums_problems_solutions_and_token_bounds():
    from vcppo_megatron.data import chain_sums
    from vcppo_megatron.data.synthetic import synthetic_task

    task = synthetic_task(load_config(RECIPE, ["data.task=chain_sums"]).data)
    problems = task.make_problems(3000, seed=5)
    assert problems == task.make_problems(3000, seed=5) and problems != task.make_problems(3000, seed=6)
    tokenizer = task.build_tokenizer()
    counts, lengths, longest_prompt = Counter(), [], 0
    for p in problems:
        letters = p.prompt[:-1][0::2]
        digits = p.prompt[:-1][1::2]
        assert p.prompt.endswith("=") and letters == chain_sums.LETTERS[:len(letters)]
        terms = [int(d) for d in digits]
        assert p.answer == str(sum(terms))
        # the chain, parsed back: each step adds the next tagged term to the running total
        body = p.solution()
        assert body.startswith("<think>") and body.endswith(f"</think>\\boxed{{{p.answer}}}")
        total = terms[0]
        steps = body[len("<think>"):body.index("</think>")].split(",")
        assert len(steps) == len(terms) - 1
        for i, step in enumerate(steps, start=1):
            left, new = step.split("=")
            before, tagged = left.split("+")
            assert (int(before), tagged, int(new)) == (total, f"{letters[i]}{terms[i]}", total + terms[i])
            total += terms[i]
        ids = tokenizer(p.solution(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokenizer.decode(ids[:-1]) == p.solution() and tokenizer.unk_token_id not in ids[:-1]
        lengths.append(len(ids))
        counts[len(terms)] += 1
        longest_prompt = max(longest_prompt, len(tokenizer(p.prompt, add_special_tokens=False)["input_ids"]))
    assert sorted(counts) == list(range(chain_sums.MIN_TERMS, chain_sums.MAX_TERMS + 1))
    assert min(lengths) >= 100, "a correct response is at least 100 tokens (0.95^100 ≈ 0.006)"
    assert max(lengths) <= task.max_response_tokens and longest_prompt == task.max_prompt_tokens
    assert max(lengths) > task.max_response_tokens - 12                          # the bound is close


def test_chain_sums_rollout_limits_are_checked():
    check_layout(load_config(ROOT_EXAMPLES / "tiny_cot_cpu.yaml"), world_size=2)     # the recipe fits
    with pytest.raises(ConfigError, match="data.task = 'chain_sums'"):
        check_layout(load_config(RECIPE, ["data.task=chain_sums"]), world_size=2)
