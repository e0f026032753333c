"""Problem loading (jsonl, parquet), bad-row reporting, resumable order, and the chat template."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vcppo_megatron.data import BadRowError, PromptOrder, encode_prompt, format_prompt, load_problems

ROOT = Path(__file__).resolve().parents[2]
QWEN2 = ROOT / "assets" / "tokenizers" / "qwen2"

GOOD = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+3?", "answer": 5},
        {"problem": "Find x.", "answer": "\\frac{1}{2}", "extra": [1]}]
BAD_LINES = ['{"problem": "p", "answer": ', '["not", "an", "object"]', '{"answer": "1"}',
             '{"problem": "", "answer": "1"}', '{"problem": 3, "answer": "1"}',
             '{"problem": "p"}', '{"problem": "p", "answer": "  "}', '{"problem": "p", "answer": true}',
             '{"problem": "p", "answer": [1]}']
REASONS = ["bad JSON", "expected a JSON object", "missing field 'problem'",
           "'problem' = '': expected a non-empty string", "'problem' = 3: expected a non-empty string",
           "missing field 'answer'", "expected a non-empty string or an integer",
           "'answer' = True", "'answer' = [1]"]


def write_mixed(path: Path) -> list[int]:
    """GOOD rows interleaved with BAD_LINES and a blank line; returns the bad rows' line numbers."""
    lines, bad_linenos = [], []
    for i, bad in enumerate(BAD_LINES):
        if i < len(GOOD):
            lines.append(json.dumps(GOOD[i]))
        lines.append(bad)
        bad_linenos.append(len(lines))
    lines.insert(1, "   ")
    bad_linenos = [n + 1 if n >= 2 else n for n in bad_linenos]
    path.write_text("\n".join(lines) + "\n")
    return bad_linenos


def test_jsonl_skip_reports_every_bad_row_with_location(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    linenos = write_mixed(path)
    with caplog.at_level(logging.WARNING):
        problems, report = load_problems(path, on_bad_row="skip")
    assert [(p.problem, p.answer) for p in problems] == [(g["problem"], str(g["answer"])) for g in GOOD]
    assert problems[1].location == f"{path}:line 4"      # line 2 is blank
    assert (report.num_rows, report.num_loaded, report.num_skipped) == (12, 3, 9)
    for lineno, reason, message in zip(linenos, REASONS, report.bad_rows, strict=True):
        assert message.startswith(f"{path}:line {lineno}: "), message
        assert reason in message, (reason, message)
    assert "loaded 3 of 12 rows (9 malformed rows skipped)" in caplog.text
    assert f"{path}:line {linenos[0]}" in caplog.text and f"{path}:line {linenos[-1]}" not in caplog.text


def test_jsonl_fail_raises_at_the_first_bad_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    linenos = write_mixed(path)
    with pytest.raises(BadRowError, match=rf"mixed.jsonl:line {linenos[0]}: bad JSON"):
        load_problems(path)
    path.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(BadRowError, match=r":line 1: missing field 'problem'.*question"):
        load_problems(path, problem_key="problem", on_bad_row="fail")
    with pytest.raises(BadRowError, match=r":line 1: none of the fields \['problem', 'query'\] \(fields: \['answer', "
                                          r"'question'\]\)"):
        load_problems(path, problem_key=["problem", "query"])
    for keys in ("question", ["problem", "question"]):
        problems, report = load_problems(path, problem_key=keys)
        assert problems[0].problem == "q" and report.problem_key == "question"


def test_bad_files_and_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="'.csv', expected .jsonl or .parquet"):
        load_problems(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text('{"problem": ""}\n')
    with pytest.raises(ValueError, match="loaded 0 of 1 rows.*expected at least one valid problem"):
        load_problems(tmp_path / "empty.jsonl", on_bad_row="skip")
    with pytest.raises(ValueError, match="on_bad_row = 'ignore'"):
        load_problems(tmp_path / "empty.jsonl", on_bad_row="ignore")


def test_parquet_rows_and_columns(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({"question": ["a?", None, "c?", "d?"], "gold": ["1", "2", "", "4"],
                      "other": [1, 2, 3, 4]})
    path = tmp_path / "set.parquet"
    pq.write_table(table, path, row_group_size=2)                    # rows span two row groups
    problems, report = load_problems(path, problem_key="question", answer_key="gold",
                                     on_bad_row="skip")
    assert [(p.problem, p.answer, p.location) for p in problems] == [
        ("a?", "1", f"{path}:row 1"), ("d?", "4", f"{path}:row 4")]
    assert report.bad_rows[0].startswith(f"{path}:row 2: field 'question' = None")
    assert report.bad_rows[1].startswith(f"{path}:row 3: field 'gold' = ''")
    with pytest.raises(BadRowError, match=r"set.parquet:row 2: field 'question'"):
        load_problems(path, problem_key="question", answer_key="gold")
    with pytest.raises(BadRowError, match=r"columns \['problem', 'answer'\] not found.*question"):
        load_problems(path, problem_key="problem", answer_key="answer")
    with pytest.raises(BadRowError, match=r"columns \[\['answer', 'solution'\]\] not found.*gold"):
        load_problems(path)                          # 'question' is the second name tried for the problem


@pytest.mark.parametrize("name,rows", [("gsm8k_test", 1319), ("math500", 500), ("aime24", 30),
                                       ("aime25", 30)])
def test_bundled_datasets_load_cleanly(name, rows):
    problems, report = load_problems(ROOT / "datasets" / f"{name}.jsonl")
    assert (report.num_loaded, report.num_skipped) == (rows, 0)
    assert all(p.problem.strip() and p.answer.strip() for p in problems)


def test_order_is_deterministic_covers_epochs_and_resumes():
    order = PromptOrder(10, seed=7)
    batches = [order.next_indices(4) for _ in range(5)]                 # 20 = two epochs
    flat = sum(batches, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:] and flat[:10] != list(range(10))     # reshuffled per epoch
    again = PromptOrder(10, seed=7)
    assert [again.next_indices(4) for _ in range(5)] == batches
    assert PromptOrder(10, seed=8).next_indices(10) != flat[:10]
    # resume mid-epoch from a checkpointed state: same continuation as an uninterrupted run
    first = PromptOrder(10, seed=7)
    first.next_indices(4)
    first.next_indices(4)
    state = dict(first.state_dict())
    assert state == {"num_items": 10, "seed": 7, "shuffle": True, "epoch": 0, "position": 8}
    resumed = PromptOrder(10, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_indices(4) for _ in range(3)] == batches[2:]
    assert PromptOrder(5, seed=0, shuffle=False).next_indices(7) == [0, 1, 2, 3, 4, 0, 1]
    with pytest.raises(ValueError, match="num_items = 10: expected 11"):
        PromptOrder(11, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed = 7: expected 8"):
        PromptOrder(10, seed=8).load_state_dict(state)


def test_chat_template_of_qwen2_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(QWEN2))
    text = format_prompt("What is 6*7?", tokenizer)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nThink step by step inside <think> and </think>" in text
    assert "\\boxed{answer}.\n\nWhat is 6*7?<|im_end|>" in text
    ids = encode_prompt("What is 6*7?", tokenizer)
    assert ids[0] == 151644 and ids.count(151644) == 3 and ids.count(151645) == 2   # im_start/end
    assert tokenizer.decode(ids) == text
    plain = format_prompt("What is 6*7?", tokenizer, template="plain")
    assert plain.startswith("User: Think step by step") and plain.endswith("What is 6*7?\nAssistant:")


def test_plain_template_without_chat_template():
    from vcppo_megatron.data.synthetic import build_tokenizer

    tokenizer = build_tokenizer()
    assert format_prompt("1+2=", tokenizer) == format_prompt("1+2=", None, template="plain")
    assert "<think>" in format_prompt("1+2=", tokenizer) and "\\boxed{" in format_prompt("1+2=", tokenizer)
    assert format_prompt("1+2=", tokenizer, template="none") == "1+2="
    assert encode_prompt("1+2=", tokenizer, template="none") == tokenizer("1+2=")["input_ids"]
    with pytest.raises(ValueError, match="no chat_template"):
        format_prompt("1+2=", tokenizer, template="chat")
    with pytest.raises(ValueError, match="template = 'jinja'"):
        format_prompt("1+2=", tokenizer, template="jinja")


# ---- data as users bring it: GSM8K's and MATH's own formats, parquet from HF datasets ----------
def _gsm8k_original_rows() -> list[dict]:
    """The shipped GSM8K train split back in openai/grade-school-math's format (question, worked answer)."""
    shipped = [json.loads(line) for line in (ROOT / "datasets" / "gsm8k_train.jsonl").open()]
    return [{"question": r["problem"], "answer": f"{r['solution']}\n#### {r['answer']}"} for r in shipped]


def test_gsm8k_own_format_loads_with_the_final_answer(tmp_path):
    rows = _gsm8k_original_rows()
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shipped = [json.loads(line)["answer"] for line in (ROOT / "datasets" / "gsm8k_train.jsonl").open()]
    for fmt in ("auto", "gsm8k"):
        problems, report = load_problems(path, problem_key="question", answer_format=fmt)
        assert [p.answer for p in problems] == shipped and len(problems) == 7473
        assert problems[0].problem.startswith("Natalia sold clips")
        assert report.answer_format == "gsm8k"
    assert report.summary() == (f"{path}: loaded 7473 of 7473 rows (0 malformed rows skipped); problem: field "
                                f"'question'; answer: the text after the last '####' of field 'answer' "
                                f"(data.answer_format = gsm8k)")
    _, auto = load_problems(path)               # the defaults: 'question' is tried after 'problem'
    assert auto.summary().endswith(f"problem: field 'question'; answer: the text after the last '####' of field "
                                   f"'answer' (data.answer_format = auto, chose 'gsm8k' from {path}:line 1)")
    # "field" takes the worked text as it is: the user asked for it
    whole, _ = load_problems(path, problem_key="question", answer_format="field")
    assert whole[0].answer == rows[0]["answer"]


def test_gsm8k_answers_lose_thousands_separators_and_bad_rows_name_line_and_field(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q1", "answer": "a\n#### 1,234"}) + "\n"
                    + json.dumps({"question": "q2", "answer": "no final line"}) + "\n"
                    + json.dumps({"question": "q3", "answer": "x\n####   -7.5 "}) + "\n")
    with pytest.raises(BadRowError, match=r"g.jsonl:line 2: field 'answer' = 'no final line' \(its end\): "
                                          r"expected a solution whose last line is '#### <answer>'"):
        load_problems(path, problem_key="question", answer_format="gsm8k")
    problems, report = load_problems(path, problem_key="question", on_bad_row="skip", answer_format="auto")
    assert [p.answer for p in problems] == ["1234", "-7.5"]
    assert report.bad_rows == [f"{path}:line 2: field 'answer' = 'no final line' (its end): expected a solution "
                               f"whose last line is '#### <answer>' (format 'gsm8k') [data.answer_format = auto, "
                               f"chose 'gsm8k' from {path}:line 1; set data.answer_format to read this file otherwise]"]


MATH_ROWS = [
    {"problem": "Half of one?", "solution": "Divide: $\\frac{1}{2}$, so the answer is $\\boxed{\\frac{1}{2}}$."},
    {"problem": "Point?",
     "solution": "First $\\boxed{0}$ was wrong; $r=3$: $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$"},
    {"problem": "Set?", "solution": "So $\\fbox{\\{1, 2\\}}$."},
    {"problem": "Old style?", "solution": "It is $\\boxed 5$."},
]


def test_math_own_format_loads_the_last_boxed_answer(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    for fmt in ("auto", "boxed"):
        problems, report = load_problems(path, answer_key="solution", answer_format=fmt)
        assert [p.answer for p in problems] == ["\\frac{1}{2}", "\\left( 3, \\frac{\\pi}{2} \\right)",
                                                "\\{1, 2\\}", "5"]
        assert report.answer_format == "boxed"
    path.write_text(json.dumps(MATH_ROWS[0]) + "\n" + json.dumps({"problem": "p", "solution": "none here"}) + "\n")
    with pytest.raises(BadRowError, match=r"math.jsonl:line 2: field 'solution' = 'none here' \(its end\): "
                                          r"expected a solution with the answer in \\boxed\{...\}.*auto, chose 'boxed'"):
        load_problems(path, answer_key="solution", answer_format="auto")
    with pytest.raises(BadRowError,
                       match=r"math.jsonl:line 1: missing field 'answer' \(fields: \['problem', 'solution'\]\)"):
        load_problems(path, answer_key="answer")
    # the defaults: 'solution' is tried after 'answer', and auto reads it as MATH's \boxed{} solutions
    problems, report = load_problems(tmp_path / "math.jsonl", on_bad_row="skip")
    assert [p.answer for p in problems] == ["\\frac{1}{2}"] and report.answer_key == "solution"


def test_boxed_extraction_round_trips_every_math500_answer():
    """Every MATH-500 answer, boxed inside a sentence, comes back unchanged (nested braces, \\{ \\})."""
    from vcppo_megatron.data.answers import last_boxed

    answers = [json.loads(line)["answer"] for line in (ROOT / "datasets" / "math500.jsonl").open()]
    assert len(answers) == 500
    assert [last_boxed(f"Thus $x = \\boxed{{{a}}}$ and we are done.") for a in answers] == [a.strip() for a in answers]


def test_auto_keeps_plain_answer_files_as_they_are(tmp_path):
    for name in ("gsm8k_test", "math500", "aime24"):
        problems, report = load_problems(ROOT / "datasets" / f"{name}.jsonl", answer_format="auto")
        reference, _ = load_problems(ROOT / "datasets" / f"{name}.jsonl", answer_format="field")
        assert problems == reference and report.answer_format == "field"
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"problem": "p", "answer": 5}) + "\n"
                    + json.dumps({"problem": "q", "answer": "a\n#### 7"}) + "\n")
    with pytest.raises(BadRowError, match=r"line 2: field 'answer' is written as 'gsm8k' \(format 'field' expected\)"):
        load_problems(path, answer_format="auto")
    with pytest.raises(BadRowError, match=r"line 1: field 'answer' = 5: expected text with the answer"):
        load_problems(path, answer_format="gsm8k")
    with pytest.raises(ValueError, match="data.answer_format = 'latex'"):
        load_problems(path, answer_format="latex")


def test_parquet_written_by_hf_datasets_loads_like_jsonl(tmp_path):
    """`datasets.Dataset.to_parquet` (GSM8K's own rows) and a verl-style file with nested fields."""
    import datasets

    rows = _gsm8k_original_rows()[:300]
    path = tmp_path / "gsm8k.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path), batch_size=128)     # several row groups
    problems, report = load_problems(path, problem_key="question")
    shipped = [json.loads(line)["answer"] for line in (ROOT / "datasets" / "gsm8k_train.jsonl").open()][:300]
    assert [p.answer for p in problems] == shipped and report.answer_format == "gsm8k"
    assert problems[129].location == f"{path}:row 130"
    # verl's preprocessed GSM8K: chat messages, reward_model.ground_truth, extra_info.question
    verl = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": r["question"] + " Let's think."}],
             "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"index": i, "question": r["question"]}}
            for i, (r, a) in enumerate(zip(rows, shipped))]
    verl[5]["reward_model"]["ground_truth"] = ""
    vpath = tmp_path / "verl.parquet"
    datasets.Dataset.from_list(verl).to_parquet(str(vpath))
    with pytest.raises(BadRowError, match=r"verl.parquet:row 6: field 'reward_model.ground_truth' = '': expected a "
                                          r"non-empty string"):
        load_problems(vpath, problem_key="extra_info.question", answer_key="reward_model.ground_truth")
    loaded, _ = load_problems(vpath, problem_key="extra_info.question", answer_key="reward_model.ground_truth",
                              on_bad_row="skip")
    assert [(p.problem, p.answer) for p in loaded] == [(r["question"], a) for i, (r, a) in
                                                       enumerate(zip(rows, shipped)) if i != 5]
    with pytest.raises(BadRowError, match=r"columns \['reward.truth'\] not found: expected them among "
                                          r"\['data_source', 'prompt', 'reward_model', 'extra_info'\]"):
        load_problems(vpath, problem_key="extra_info.question", answer_key="reward.truth")
    with pytest.raises(BadRowError, match=r"row 1: missing field 'extra_info.q' \(fields of 'extra_info': "
                                          r"\['index', 'question'\]\)"):
        load_problems(vpath, problem_key="extra_info.q", answer_key="reward_model.ground_truth")
    # the same nesting in jsonl
    jpath = tmp_path / "verl.jsonl"
    jpath.write_text(json.dumps(verl[0]) + "\n")
    assert load_problems(jpath, problem_key="extra_info.question", answer_key="reward_model.ground_truth")[0][0].answer \
        == shipped[0]


def test_eval_path_lists_need_distinct_names():
    """data.eval_path: one file or a list; each set is named by its file stem, so stems must differ."""
    from vcppo_megatron.config import ConfigError, load_config
    from vcppo_megatron.trainer.setup import eval_paths

    assert eval_paths(load_config(None)) == []
    assert eval_paths(load_config(None, ["data.eval_path=a/x.jsonl"])) == ["a/x.jsonl"]
    assert eval_paths(load_config(None, ["data.eval_path=[a/x.jsonl,b/y.parquet]"])) == ["a/x.jsonl", "b/y.parquet"]
    with pytest.raises(ConfigError, match=r"'a/x.jsonl' and 'b/x.parquet' would both report as 'x'"):
        eval_paths(load_config(None, ["data.eval_path=[a/x.jsonl,b/x.parquet]"]))
    with pytest.raises(ConfigError, match=r"data.eval_path = \[\]: expected a file, a list of files, or null"):
        eval_paths(load_config(None, ["data.eval_path=[]"]))
