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
        load_problems(path, on_bad_row="fail")
    problems, _ = load_problems(path, problem_key="question")
    assert problems[0].problem == "q"


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
        load_problems(path)


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
