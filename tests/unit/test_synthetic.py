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
    nines = chain_sums.ChainProblem((9,) * chain_sums.MAX_TERMS).solution()         # the bound is tight
    assert len(tokenizer(nines, add_special_tokens=False)["input_ids"]) + 1 == task.max_response_tokens


def test_chain_sums_demonstrations_slip_mid_chain_at_the_set_rates():
    """The SFT data: the same problems, each step slipping (a carry dropped or added: the new total
    off by 10 the wrong way; or the term skipped) at SLIP_RATES; the chain then continues correctly
    from the wrong total and boxes it; a demonstration without slips is the solution."""
    from vcppo_megatron.data import chain_sums

    demos = chain_sums.make_demonstrations(3000, seed=8)
    assert [d.terms for d in demos] == [q.terms for q in chain_sums.make_problems(3000, seed=8)]
    steps = slipped = lucky = 0
    counts = Counter()
    for d in demos:
        text = d.demonstration()
        if not d.slips:
            assert text == d.solution()
            continue
        slips = dict(d.slips)
        chain = text[len("<think>"):text.index("</think>")].split(",")
        total, k = d.terms[0], 0
        for i in range(1, len(d.terms)):
            if slips.get(i) == "skip":
                assert all(f"+{chain_sums.LETTERS[i]}" not in step for step in chain)
                continue
            before, rest = chain[k].split("+")
            tagged, new = rest.split("=")
            assert (int(before), tagged) == (total, f"{chain_sums.LETTERS[i]}{d.terms[i]}")
            want = total + d.terms[i]
            if slips.get(i) == "carry":
                want += -10 if total % 10 + d.terms[i] >= 10 else 10
            assert int(new) == want, (text, i)
            total, k = want, k + 1
        assert k == len(chain) and text.endswith(f"\\boxed{{{total}}}")
        lucky += str(total) == d.answer               # a skipped 0, or slips that cancel
        slipped += 1
    assert 0.4 < slipped / len(demos) < 0.65 and lucky / slipped < 0.15, (slipped, lucky)
    for d in demos:
        steps += len(d.terms) - 1
        counts.update(kind for _, kind in d.slips)
    for kind, rate in chain_sums.SLIP_RATES.items():
        assert abs(counts[kind] / steps - rate) < 0.2 * rate, (kind, counts[kind] / steps)


def test_chain_sums_rollout_limits_are_checked():
    check_layout(load_config(ROOT_EXAMPLES / "tiny_cot_cpu.yaml"), world_size=2)     # the recipe fits
    with pytest.raises(ConfigError, match="data.task = 'chain_sums'"):
        check_layout(load_config(RECIPE, ["data.task=chain_sums"]), world_size=2)


def test_chain_task_report_classifies_where_a_chain_goes_wrong():
    """tools/chain_task_report.py: the first wrong step of a response and its kind."""
    import importlib.util

    from vcppo_megatron.data.chain_sums import ChainProblem

    spec = importlib.util.spec_from_file_location("chain_task_report", ROOT_EXAMPLES.parent / "tools" / "chain_task_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    q = ChainProblem((7, 3, 9, 2))                  # 7+b3=10,10+c9=19,19+d2=21
    assert q.steps() == ["7+b3=10", "10+c9=19", "19+d2=21"]
    assert report.classify(q.solution(), q) is None
    cases = {"<think>7+b3=10,10+c9=18,18+d2=20</think>\\boxed{20}": (1, "total miscalculated"),
             "<think>7+b3=10,10+c8=18,18+d2=20</think>\\boxed{20}": (1, "term copied wrong"),
             "<think>7+b3=10,10+d2=12</think>\\boxed{12}": (1, "term skipped or repeated"),
             "<think>7+b3=10,11+c9=20,20+d2=22</think>\\boxed{22}": (1, "running total copied wrong"),
             "<think>7+b3=10</think>\\boxed{10}": (1, "chain stopped early"),
             "</think>\\boxed{21}": (0, "chain stopped early"),
             "<think>7+b3=10,10c9=19,19+d2=21</think>\\boxed{21}": (1, "malformed step"),
             "<think>7+b3=10,10+c9=19,19+d2=21,21+e0=21</think>\\boxed{21}": (3, "chain ran long")}
    for text, want in cases.items():
        assert report.classify(text, q) == want, text


def test_chain_sums_terms_value_ceiling_matches_a_simulated_critic():
    """The explained variance of a critic that predicts E[reward | number of terms], by simulation
    (float64, rewards ±1 as the verifier gives), equals the closed form the report quotes."""
    import numpy as np

    from vcppo_megatron.data.chain_sums import SFT_SAMPLED_ACCURACY, terms_value_ceiling

    rng = np.random.default_rng(0)
    terms = np.array(sorted(SFT_SAMPLED_ACCURACY))
    p = np.array([SFT_SAMPLED_ACCURACY[t] for t in terms])
    which = rng.integers(0, len(terms), 2_000_000)
    reward = np.where(rng.random(which.size) < p[which], 1.0, -1.0)
    value = 2 * p[which] - 1                                     # E[reward | terms]
    ev = 1 - np.var(reward - value) / np.var(reward)
    assert abs(ev - terms_value_ceiling()) < 2e-3, (ev, terms_value_ceiling())
    assert 0.01 < terms_value_ceiling() < 0.03
    assert terms_value_ceiling({1: 0.0, 2: 1.0}) == 1.0 and terms_value_ceiling({1: 0.5, 2: 0.5}) == 0.0


def test_chain_sums_graded_tags_the_prompt_and_scales_the_slips():
    """chain_sums_graded: the chain_sums problems (same terms, same chains), each prompt opened by a
    pace tag drawn uniformly; the demonstrations slip at SLIP_RATES x the pace's factor, so their
    success rate by pace follows `demonstration_success`; the task fits its token bounds."""
    from vcppo_megatron.data import chain_sums
    from vcppo_megatron.data.synthetic import synthetic_task

    cfg = load_config(RECIPE, ["data.task=chain_sums_graded", "rollout.max_prompt_tokens=38"])
    task = synthetic_task(cfg.data)
    plain, graded = chain_sums.make_problems(3000, seed=3), task.make_problems(3000, seed=3)
    assert [g.terms for g in graded] == [p.terms for p in plain]
    assert all(g.prompt == g.pace + p.prompt and g.solution() == p.solution() for g, p in zip(graded, plain))
    assert graded == task.make_problems(3000, seed=3)
    paces = Counter(g.pace for g in graded)
    assert set(paces) == set(chain_sums.PACES) and min(paces.values()) > 900
    tokenizer = task.build_tokenizer()
    longest = max(len(tokenizer(g.prompt, add_special_tokens=False)["input_ids"]) for g in graded)
    assert longest == task.max_prompt_tokens == chain_sums.prompt_tokens() + 1
    assert tokenizer.unk_token_id not in tokenizer(graded[0].prompt, add_special_tokens=False)["input_ids"]

    demos = task.make_demonstrations(6000, seed=4)
    assert [d.terms for d in demos] == [q.terms for q in task.make_problems(6000, seed=4)]
    for pace, factor in chain_sums.PACES.items():
        mine = [d for d in demos if d.pace == pace]
        steps = sum(len(d.terms) - 1 for d in mine)
        slips = sum(len(d.slips) for d in mine)
        rate = sum(chain_sums.SLIP_RATES.values()) * factor
        assert abs(slips / steps - rate) < 0.15 * rate + 1e-3, (pace, slips / steps, rate)
        right = sum(d.demonstration() == d.solution() for d in mine) / len(mine)
        expect = sum(chain_sums.demonstration_success(pace, len(d.terms)) for d in mine) / len(mine)
        assert abs(right - expect) < 0.04, (pace, right, expect)
    # the prompt shows ~0.4 of the outcome's variance (chain_sums's demonstrations: < 0.01)
    ceiling = chain_sums.terms_value_ceiling({(p, t): chain_sums.demonstration_success(p, t)
                                              for p in chain_sums.PACES
                                              for t in range(chain_sums.MIN_TERMS, chain_sums.MAX_TERMS + 1)})
    assert 0.3 < ceiling < 0.5, ceiling
    # chain_sums itself has no tag
    assert not any(d.pace for d in chain_sums.make_demonstrations(50, seed=4))


def test_value_ceiling_from_measured_accuracies_removes_the_sampling_noise():
    """Accuracies measured from a few samples per key spread out by chance alone: with `counts`
    the ceiling estimated from them matches the true one (simulated, float64)."""
    import numpy as np

    from vcppo_megatron.data.chain_sums import SFT_SAMPLED_ACCURACY, terms_value_ceiling

    rng = np.random.default_rng(1)
    n = 60
    raw, corrected = [], []
    for _ in range(400):
        measured = {t: rng.binomial(n, p) / n for t, p in SFT_SAMPLED_ACCURACY.items()}
        raw.append(terms_value_ceiling(measured))
        corrected.append(terms_value_ceiling(measured, {t: n for t in measured}))
    true = terms_value_ceiling()
    assert np.mean(raw) > 1.5 * true                     # the noise alone would double it
    assert abs(np.mean(corrected) - true) < 0.3 * true, (np.mean(corrected), true)
