"""tools/plan.py and memory_plan: the 32B recipes fit 8 x 8 H100 80GB; broken layouts are named."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vcppo_megatron.config import load_config
from vcppo_megatron.parallel.memory_plan import GIB, ModelShape, PlanError, make_plan

ROOT = Path(__file__).resolve().parents[2]
RECIPES = [ROOT / "examples" / f"qwen2.5_32b_{name}.yaml" for name in ("vcppo", "vapo", "ppo_baseline")]
QWEN32B = json.loads((ROOT / "examples" / "models" / "Qwen2.5-32B" / "config.json").read_text())


def test_qwen32b_parameter_count_matches_the_published_size():
    """32.76B parameters: the bf16 checkpoint's safetensors index lists total_size 65,527,752,704 bytes."""
    layers, outer = ModelShape.from_hf(QWEN32B).params(lm_head=True)
    assert abs((layers + outer) * 2 - 65_527_752_704) < 1e6
    h, kv, ffn = 5120, 8 * 128, 27648             # q, k, v (+ biases), o, gate/up/down, two norms
    by_hand = 64 * (h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * ffn + 2 * h) + 2 * 152064 * h + h
    assert layers + outer == by_hand


def test_plan_counts_by_hand_for_one_layout():
    """Weights, grads and optimizer bytes follow the documented bytes per parameter."""
    cfg = load_config(RECIPES[1])
    plans = {p.role: p for p in make_plan(cfg, QWEN32B, nodes=8, gpus_per_node=8)}
    layers, outer = ModelShape.from_hf(QWEN32B).params(lm_head=True)
    per_gpu = (layers + outer) / 8                       # actor TP8 PP1
    assert plans["actor"].items["weights"] == pytest.approx(per_gpu * 2)
    assert plans["actor"].items["grads"] == pytest.approx(per_gpu * 4)
    assert plans["actor"].items["optimizer"] == pytest.approx(per_gpu * 12 / 8)
    kv_per_token = 2 * 64 * 8 * 128 * 2 / 4             # layers, KV heads, head dim, bf16, rollout TP4
    assert plans["rollout"].items["weights"] == pytest.approx((layers + outer) / 4 * 2)
    assert plans["rollout"].items["kv_cache"] / kv_per_token > 21504  # at least one 21.5k-token sequence


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_plan_accepts_the_32b_recipes_on_8x8_h100(recipe):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(recipe),
                          "--nodes", "8", "--gpus-per-node", "8"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "OK: the layout fits" in out.stdout
    for role in ("rollout", "actor", "critic"):
        line = next(line for line in out.stdout.splitlines() if line.strip().startswith(role + " "))
        used, total = line.split("total=")[1].split(" GiB")[0].split(" / ")
        assert 0 < float(used) <= float(total) == 80.0, line


@pytest.mark.parametrize("overrides, args, fragment", [
    (["actor.parallel.tensor_parallel_size=16"], (4, 16), "'actor.parallel.tensor_parallel_size' = 16: must divide "
                                                         "the attention heads (40)"),
    (["critic.parallel.tensor_parallel_size=5"], (8, 8), "'critic.parallel.tensor_parallel_size' = 5: must divide "
                                                        "the query groups / KV heads (8)"),
    (["actor.parallel.pipeline_parallel_size=3"], (8, 8), "'actor.parallel.pipeline_parallel_size' = 3: must divide "
                                                         "the layers (64)"),
    (["actor.parallel.pipeline_parallel_size=2"], (3, 8), "= 16 must divide the world size 24"),
    (["rollout.tensor_parallel_size=8"], (8, 4), "'rollout.tensor_parallel_size' = 8: exceeds the 4 GPUs"),
    (["batch.global_mini_batch_size=500"], (8, 8), "'batch.global_mini_batch_size' = 500"),
    (["actor.parallel.tensor_parallel_size=2"], (8, 8), "actor [TP2 PP1 DP32] needs"),
    (["critic.parallel.recompute_activations=none"], (8, 8), "(largest: activations"),
    (["rollout.gpu_memory_utilization=0.25"], (8, 8), "less than one sequence of 21504"),
])
def test_plan_rejects_broken_layouts_naming_the_problem(overrides, args, fragment):
    cfg = load_config(RECIPES[1], overrides)
    with pytest.raises(PlanError) as err:
        make_plan(cfg, QWEN32B, nodes=args[0], gpus_per_node=args[1])
    assert fragment in str(err.value), str(err.value)


def test_plan_cli_exits_nonzero_with_the_message():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(RECIPES[0]),
                          "--nodes", "8", "--gpus-per-node", "8", "actor.parallel.tensor_parallel_size=3"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "does not fit" in out.stderr and "'actor.parallel.tensor_parallel_size' = 3" in out.stderr


def test_memory_over_the_gpu_names_the_largest_item():
    cfg = load_config(RECIPES[1], ["actor.parallel.tensor_parallel_size=1", "critic.parallel.tensor_parallel_size=1"])
    with pytest.raises(PlanError, match=r"over the 80 GiB of a GPU \(largest: grads"):
        make_plan(cfg, QWEN32B, nodes=8, gpus_per_node=8)
    assert GIB == 2 ** 30
