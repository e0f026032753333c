"""pass@k / avg@k against brute-force enumeration; tools/evaluate.py end to end on a tiny model."""
from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from vcppo_megatron.algorithms.pass_at_k import avg_at_k, default_ks, mean_pass_at_k, pass_at_k

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    """tools/evaluate.py as a module (by path: an installed `evaluate` package may exist)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vcppo_tools_evaluate", ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def brute_pass_at_k(correct: list[bool], k: int) -> Fraction:
    """Fraction of all k-subsets of the samples holding at least one correct sample."""
    subsets = list(itertools.combinations(correct, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def test_pass_at_k_equals_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert abs(pass_at_k(n, c, k) - float(brute_pass_at_k(correct, k))) <= 1e-12, (n, c, k)
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-15)


def test_pass_at_k_is_stable_for_large_n():
    for n, c, k in [(1000, 3, 100), (1000, 997, 2), (500, 1, 250), (2000, 1000, 1000)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert abs(pass_at_k(n, c, k) - float(exact)) <= 1e-12, (n, c, k)


def test_avg_and_mean_pass_at_k():
    counts, n = [0, 3, 8, 1], 8
    samples = [[True] * c + [False] * (n - c) for c in counts]
    assert avg_at_k(counts, n) == pytest.approx(sum(sum(s) for s in samples) / (n * len(counts)))
    assert avg_at_k(counts, n) == pytest.approx(mean_pass_at_k(counts, n, 1))
    for k in (2, 5, 8):
        ref = sum(brute_pass_at_k(s, k) for s in samples) / len(samples)
        assert mean_pass_at_k(counts, n, k) == pytest.approx(float(ref), abs=1e-12)
    assert default_ks(32) == [1, 2, 4, 8, 16, 32] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]
    with pytest.raises(ValueError, match="k = 9: expected 1 <= k <= n = 8"):
        pass_at_k(8, 2, 9)
    with pytest.raises(ValueError, match="c = 9"):
        pass_at_k(8, 9, 1)


def test_bad_model_dirs_get_clear_errors(tmp_path):
    evaluate = load_tool()
    (tmp_path / "latest").write_text("step_00000001")
    with pytest.raises(SystemExit, match="Megatron checkpoint that could not be converted"):
        evaluate.resolve_model_dir(tmp_path, tmp_path / "work")
    (tmp_path / "latest").unlink()
    with pytest.raises(SystemExit, match="no config.json and no Megatron checkpoint"):
        evaluate.resolve_model_dir(tmp_path, tmp_path / "work")
    with pytest.raises(SystemExit, match="not a directory"):
        evaluate.resolve_model_dir(tmp_path / "missing", tmp_path / "work")


@pytest.mark.parametrize("form", ["hf", "megatron"])
def test_evaluate_tool_end_to_end_on_tiny_model(tmp_path, capsys, form):
    """A tiny random Qwen2 + the synthetic tokenizer, on a jsonl of `a+b=` problems; the same model
    as a Megatron checkpoint (converted by the tool) scores exactly the same samples."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vcppo_megatron.data.synthetic import build_tokenizer, make_problems

    evaluate = load_tool()
    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         torch_dtype="float32", eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    problems = make_problems(6, seed=3, max_operands=2)
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"problem": p.prompt, "answer": p.answer}) + "\n"
                            for p in problems))
    out = tmp_path / "results.json"
    samples = 4
    args = ["--data", str(data), "--samples", str(samples), "--max-tokens", "12", "--max-prompt-tokens", "8",
            "--template", "none", "--dtype", "float32", "--kv-cache-bytes", str(32 << 20),
            "--verifier-workers", "0", "--quiet"]
    if form == "megatron":
        from vcppo_megatron.checkpoint import convert_hf_to_megatron

        reference = evaluate.main(["--model", str(model_dir), *args])
        convert_hf_to_megatron(model_dir, tmp_path / "megatron", progress=False)
        model_dir = tmp_path / "megatron"
    result = evaluate.main(["--model", str(model_dir), *args, "--out", str(out)])
    printed = capsys.readouterr().out
    if form == "megatron":
        assert "converted Megatron checkpoint" in printed
        assert result["datasets"] == reference["datasets"]        # the same weights sample the same
    assert f"{data}: loaded 6 of 6 rows (0 malformed rows skipped)" in printed
    assert "arith: 6 problems x 4 samples  avg@4" in printed
    saved = json.loads(out.read_text())
    assert saved["datasets"] == json.loads(json.dumps(result["datasets"]))
    res = saved["datasets"]["arith"]
    counts = res["correct_counts"]
    assert len(counts) == 6 and all(0 <= c <= samples for c in counts)
    assert res["avg_at_n"] == pytest.approx(sum(counts) / (samples * 6))
    assert sorted(res["pass_at_k"]) == ["1", "2", "4"]
    values = [res["pass_at_k"][k] for k in ("1", "2", "4")]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[0] == pytest.approx(res["avg_at_n"]) and values == sorted(values)   # pass@k grows
    assert res["pass_at_k"]["4"] == pytest.approx(sum(c > 0 for c in counts) / 6)
    assert 1 <= res["response_length_mean"] <= 12 and 0 <= res["truncated_frac"] <= 1
    assert res["num_skipped_prompts"] == 0


class ScriptedEngine:
    """Stands in for RolloutEngine: answers problem i correctly in the first `right[i]` samples."""

    def __init__(self, tokenizer, right: dict[str, int], max_prompt_tokens: int) -> None:
        from vcppo_megatron.config.schema import RolloutConfig

        self.config = RolloutConfig(temperature=0.5, top_p=1.0, max_prompt_tokens=max_prompt_tokens,
                                    max_response_tokens=16)
        self.tokenizer, self.right, self.seen = tokenizer, right, []

    def generate(self, prompt_token_ids, n, *, stop_token_ids=None, max_tokens=None):
        from vcppo_megatron.rollout.batch import fit_prompts, pad_responses

        self.seen.append((self.config.temperature, self.config.top_p, len(prompt_token_ids)))
        fitted = fit_prompts(prompt_token_ids, self.config.max_prompt_tokens, "skip")
        index, prompts, responses, lps, reasons = [], [], [], [], []
        for i, ids in zip(fitted.indices, fitted.prompts):
            text = self.tokenizer.decode(ids)
            total = sum(int(t) for t in text[:-1].split("+"))
            for s in range(n):
                answer = total if s < self.right[text] else total + 1
                body = f"<think>{text[:-1]}</think>\\boxed{{{answer}}}"
                tokens = self.tokenizer(body)["input_ids"] + [self.tokenizer.eos_token_id]
                index.append(i)
                prompts.append(ids)
                responses.append(tokens)
                lps.append([0.0] * len(tokens))
                reasons.append("stop" if s % 2 == 0 else "length")
        return pad_responses(index, prompts, responses, lps, reasons, 0, fitted.num_skipped)


def test_evaluate_problems_counts_with_the_real_verifier():
    from vcppo_megatron.data.prompts import MathProblem
    from vcppo_megatron.data.synthetic import build_tokenizer, make_problems
    from vcppo_megatron.trainer.evaluation import evaluate_problems

    tokenizer = build_tokenizer()
    problems = [MathProblem(p.prompt, p.answer, f"x:line {i + 1}")
                for i, p in enumerate(make_problems(7, seed=5, max_operands=2))]
    problems.append(MathProblem("1+2+3=", "6", "x:line 8"))           # too long: skipped, unsolved
    right = {p.problem: i % 5 for i, p in enumerate(problems)}
    engine = ScriptedEngine(tokenizer, right, max_prompt_tokens=4)
    res = evaluate_problems(engine, problems, tokenizer, dataset="arith", samples=4, ks=[1, 2, 4],
                            template="none", prompts_per_batch=3, num_workers=0, progress=False)
    expected = [min(right[p.problem], 4) for p in problems[:7]] + [0]
    assert res.correct_counts == expected
    assert res.num_skipped_prompts == 1 and res.num_problems == 8
    assert res.avg_at_n == pytest.approx(sum(expected) / 32)
    for k in (1, 2, 4):
        ref = sum(float(brute_pass_at_k([s < c for s in range(4)], k)) for c in expected) / 8
        assert res.pass_at_k[k] == pytest.approx(ref, abs=1e-12)
    assert res.truncated_frac == pytest.approx(0.5)
    assert engine.seen == [(1.0, 0.7, 3), (1.0, 0.7, 3), (1.0, 0.7, 2)]   # VAPO sampling, 3 chunks
    assert (engine.config.temperature, engine.config.top_p) == (0.5, 1.0)   # restored afterwards
    assert set(res.metrics()) == {"arith/avg@4", "arith/pass@1", "arith/pass@2", "arith/pass@4",
                                  "arith/response_length/mean", "arith/truncated_frac"}
    from vcppo_megatron.logging import check_tag

    for name in res.metrics():
        check_tag(f"eval/{name}")


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_held_out_sets_split_back_from_replica_shares(replicas):
    """Replica r scores problems r, r + R, ...; gathered in replica order, each set gets its problems back."""
    from vcppo_megatron.trainer.evaluation import held_out_metrics, per_problem, split_by_set

    sizes = [5, 2, 4]
    total = sum(sizes)
    gathered = [i for r in range(replicas) for i in range(r, total, replicas)]   # value = problem index
    assert split_by_set(gathered, sizes, replicas) == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9, 10]]
    with pytest.raises(ValueError, match="10 gathered values for 11 held-out problems"):
        split_by_set(gathered[:-1], sizes, replicas)
    # 3 prompts, 2 samples each, prompt 1 skipped (no samples): counts as unsolved
    rows = per_problem([0, 0, 2, 2], [1.0, -1.0, 1.0, 1.0], [3, 5, 4, 8], [False, True, False, True], 3)
    assert rows == [(1, 2, 8, 1), (0, 0, 0, 0), (2, 2, 12, 1)]
    m = held_out_metrics("gsm8k_test", rows, 2)
    assert m == {"gsm8k_test/avg@2": pytest.approx(0.5), "gsm8k_test/response_length/mean": 5.0,
                 "gsm8k_test/truncated_frac": 0.5, "gsm8k_test/pass@1": pytest.approx(0.5),
                 "gsm8k_test/pass@2": pytest.approx(2 / 3)}
