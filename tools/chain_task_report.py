"""How a policy does on the `chain_sums` task (data/chain_sums.py): the figures its design is judged by.

    python tools/chain_task_report.py --model DIR [--graded] [--problems 256] [--samples 4] [--out report.json]

DIR is an HF directory or a Megatron checkpoint (a run's `checkpoints/actor`: converted first, as in
tools/evaluate.py). On held-out problems (the trainer's eval seed for `--seed`) it reports, greedy
and sampled (temperature 1, top-p 1, the RL rollout's setting):
- accuracy overall and by number of terms (the difficulty the prompt shows), and by pace tag with
  `--graded` (`chain_sums_graded`); `value_ceiling`: the explained variance of a critic that knew
  the sampled accuracy of each number of terms (and pace), `chain_sums.terms_value_ceiling`;
- response length: mean, min, max, of all and of correct responses, and the truncated fraction;
- where wrong chains first go wrong (the step and kind: a total miscalculated, a term copied wrong,
  a step skipped or the chain stopped early / run long, or a malformed step);
- what a shortened chain is worth: the policy forced to answer after half of its correct chain,
  and with no chain at all (`<think></think>` given), greedy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def classify(text: str, problem) -> tuple[int, str] | None:
    """(index of the first wrong step, kind) of a response's chain; None when the chain is right."""
    want = problem.steps()
    body = text.split("</think>")[0].removeprefix("<think>")
    got = body.split(",") if body else []
    for i, w in enumerate(want):
        if i >= len(got):
            return i, "chain stopped early"
        g = got[i]
        if g == w:
            continue
        if g.count("=") != 1 or g.count("+") != 1:
            return i, "malformed step"
        g_left, w_left = g.split("=")[0], w.split("=")[0]
        if g_left == w_left:
            return i, "total miscalculated"
        g_before, g_term = g_left.split("+")
        w_before, w_term = w_left.split("+")
        if g_before != w_before:
            return i, "running total copied wrong"
        if g_term[:1] != w_term[:1]:
            return i, "term skipped or repeated"
        return i, "term copied wrong"
    if len(got) > len(want):
        return len(want), "chain ran long"
    return None


def forced_answers(model_dir: Path, tok, problems: list, prompts: list[list[int]]) -> dict[str, float]:
    """Greedy answers (HF) after half of the correct chain, and after no chain (`<think></think>`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vcppo_megatron.rewards import math_reward

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = {}
    for name, cut in (("half_chain_forced_answer", 0.5), ("no_chain_forced_answer", 0.0)):
        right = 0
        for q, ids in zip(problems, prompts):
            steps = q.steps()[:int(len(q.steps()) * cut)]
            prefix = ids + tok("<think>" + ",".join(steps) + "</think>\\boxed{", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                gen = model.generate(torch.tensor([prefix]), max_new_tokens=6, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            text = "\\boxed{" + tok.decode([t for t in gen[0, len(prefix):].tolist()
                                              if t not in (tok.eos_token_id, tok.pad_token_id)])
            right += math_reward(text, q.answer) > 0
        out[name] = right / len(problems)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the report; print it and return it (written as JSON with --out)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--graded", action="store_true", help="the chain_sums_graded task (pace-tagged prompts)")
    p.add_argument("--problems", type=int, default=256)
    p.add_argument("--samples", type=int, default=4, help="sampled responses per problem")
    p.add_argument("--seed", type=int, default=1235, help="problem seed (the trainer's held-out set: seed + 1)")
    p.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from evaluate import resolve_model_dir
    from transformers import AutoTokenizer

    from vcppo_megatron.config.schema import RolloutConfig
    from vcppo_megatron.data import chain_sums
    from vcppo_megatron.rewards import math_reward
    from vcppo_megatron.rollout import RolloutEngine

    with tempfile.TemporaryDirectory(prefix="chain_report_") as work:
        model_dir = resolve_model_dir(args.model, Path(work))
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        make = chain_sums.make_graded_problems if args.graded else chain_sums.make_problems
        problems = make(args.problems, args.seed)
        prompts = [tok(q.prompt, add_special_tokens=False)["input_ids"] for q in problems]
        cfg = RolloutConfig(temperature=1.0, top_p=1.0, max_prompt_tokens=chain_sums.prompt_tokens(args.graded),
                            max_response_tokens=chain_sums.response_tokens() + 16, dtype="float32",
                            kv_cache_bytes=args.kv_cache_bytes)
        engine = RolloutEngine(model_dir, cfg, seed=0, pad_token_id=tok.pad_token_id)
        drop = {tok.eos_token_id, tok.pad_token_id}
        decode = lambda ids: tok.decode([t for t in ids if t not in drop])  # noqa: E731
        report: dict = {"model": str(args.model), "problems": args.problems}
        for mode, n, greedy in (("greedy", 1, True), ("sampled", args.samples, False)):
            batch = engine.generate(prompts, n, greedy=greedy, seed=7, stop_token_ids=[tok.eos_token_id])
            by_terms: dict[int, list[int]] = defaultdict(lambda: [0, 0])
            by_cell: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])     # (pace, terms)
            lengths, right_lengths, kinds, first = [], [], Counter(), Counter()
            for i, ids, reason in zip(batch.prompt_index.tolist(), batch.response_token_ids, batch.finish_reasons):
                q, text = problems[i], decode(ids)
                ok = math_reward(text, q.answer) > 0
                by_terms[len(q.terms)][0] += ok
                by_terms[len(q.terms)][1] += 1
                by_cell[q.pace, len(q.terms)][0] += ok
                by_cell[q.pace, len(q.terms)][1] += 1
                lengths.append(len(ids))
                if ok:
                    right_lengths.append(len(ids))
                wrong = classify(text, q)
                if not ok and wrong is not None:
                    kinds[wrong[1]] += 1
                    first[wrong[0]] += 1
            total = sum(v[1] for v in by_terms.values())
            report[mode] = {
                "accuracy": sum(v[0] for v in by_terms.values()) / total,
                "accuracy_by_terms": {k: v[0] / v[1] for k, v in sorted(by_terms.items())},
                "accuracy_by_pace": {p: sum(v[0] for (q, _), v in by_cell.items() if q == p)
                                     / sum(v[1] for (q, _), v in by_cell.items() if q == p)
                                     for p in sorted({q for q, _ in by_cell}) if p},
                "value_ceiling": chain_sums.terms_value_ceiling({k: v[0] / v[1] for k, v in by_cell.items()},
                                                                {k: v[1] for k, v in by_cell.items()}),
                "length_mean": sum(lengths) / len(lengths), "length_min": min(lengths), "length_max": max(lengths),
                "correct_length_min": min(right_lengths, default=0),
                "correct_length_mean": sum(right_lengths) / max(len(right_lengths), 1),
                "truncated_frac": sum(r == "length" for r in batch.finish_reasons) / total,
                "first_error_kind": dict(kinds.most_common()),
                "first_error_step": dict(sorted(first.items()))}
        del engine
        report.update(forced_answers(model_dir, tok, problems, prompts))
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
