"""tools/bench_step.py's profile attribution: the lines of `Trainer._rl_step` map to the timed parts
(so a py-spy sample lands in the part whose `time/*_s` it counts), and a raw profile is split
per part."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOOP = ROOT / "vcppo_megatron" / "trainer" / "loop.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "tools" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_timed_part_of_the_step_has_its_lines():
    tool = _tool()
    source = LOOP.read_text()
    parts = tool._step_parts(source)
    lines = source.splitlines()
    for name in ("rollout", "values", "gae", "actor_update", "critic_update", "weight_sync"):
        mine = [n for n, p in parts.items() if p == name]
        assert mine, f"no line of _rl_step is timed as {name!r}"
        assert f'times["{name}"]' in lines[max(mine) - 1], (name, lines[max(mine) - 1])
    call = next(i + 1 for i, line in enumerate(lines) if "sample_and_score(" in line and "samples =" in line)
    assert parts[call] == "rollout"


def test_summarise_splits_samples_by_part(tmp_path):
    tool = _tool()
    source = LOOP.read_text()
    parts = tool._step_parts(source)
    line_of = {p: n for n, p in sorted(parts.items())}
    raw = tmp_path / "rank0.txt"
    step = f"_worker (bench_step.py:1);_rl_step (vcppo_megatron/trainer/loop.py:{{}})"
    raw.write_text("\n".join([
        step.format(line_of["rollout"]) + ";generate (vllm/entrypoints/llm.py:1) 30",
        step.format(line_of["critic_update"]) + ";ppo_update (vcppo_megatron/trainer/ppo.py:1) 10",
        "_worker (bench_step.py:1);_raw_generate (bench_step.py:2);generate (vllm/entrypoints/llm.py:1) 20",
        "run (tqdm/_monitor.py:1) 99",                       # another thread: not counted
    ]) + "\n")
    text = tool.summarise(raw)
    assert text.startswith("60 samples of the main thread")
    assert "rollout: 30 samples (50.0%)" in text and "critic_update: 10 samples" in text
    assert "raw_generate: 20 samples" in text and "tqdm" not in text
