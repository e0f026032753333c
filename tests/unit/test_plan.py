"""tools/plan.py and memory_plan: the 32B recipes fit 8 x 8 H100 80GB, every shipped recipe fits the
hardware its header states (the one-node recipes: 1 x 8 and 1 x 1); broken layouts are named."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vcppo_megatron.config import load_config
from vcppo_megatron.parallel import preemption
from vcppo_megatron.parallel.memory_plan import (GIB, RESERVED_BYTES, VLLM_RUNTIME_BYTES, ModelShape, PlanError,
                                                  make_plan)

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
    """Weights, grads and optimizer bytes follow the documented bytes per parameter, in each phase."""
    cfg = load_config(RECIPES[1])
    plan = make_plan(cfg, QWEN32B, nodes=8, gpus_per_node=8)
    layers, outer = ModelShape.from_hf(QWEN32B).params(lm_head=True)
    per_gpu = (layers + outer) / 8                       # actor TP8 PP1
    update = plan.row("rl", "actor_update").gpu
    assert update["actor.weights"] == pytest.approx(per_gpu * 2)
    assert update["actor.grads"] == pytest.approx(per_gpu * 4)
    assert update["actor.optimizer"] == pytest.approx(per_gpu * 12 / 8)
    assert "critic.grads" not in update and "vllm.weights" not in update      # released, asleep
    rollout = plan.row("rl", "rollout").gpu
    kv_per_token = 2 * 64 * 8 * 128 * 2 / 4             # layers, KV heads, head dim, bf16, rollout TP4
    assert rollout["vllm.weights"] == pytest.approx((layers + outer) / 4 * 2)
    assert rollout["vllm.kv_cache"] / kv_per_token > 21504                   # at least one 21.5k-token sequence
    assert rollout["vllm.runtime"] == VLLM_RUNTIME_BYTES and rollout["reserved"] == RESERVED_BYTES
    # with kv_cache_bytes null the rollout phase fills gpu_memory_utilization of the GPU exactly
    assert plan.row("rl", "rollout").total == pytest.approx(0.85 * 80 * GIB)
    assert plan.kv_cache_bytes == rollout["vllm.kv_cache"]
    assert plan.vllm_fraction == pytest.approx((rollout["vllm.weights"] + plan.kv_cache_bytes + VLLM_RUNTIME_BYTES)
                                               / (80 * GIB))
    # host memory: the released optimizer states; in value pretraining also vLLM's weights (level 1)
    critic_optimizer = plan.row("rl", "critic_update").gpu["critic.optimizer"]
    assert plan.row("rl", "rollout").host == {"actor.optimizer": update["actor.optimizer"],
                                              "critic.optimizer": critic_optimizer}
    assert plan.row("value_pretrain", "experience").host["vllm.weights"] == rollout["vllm.weights"]
    assert "vllm.weights" not in plan.row("rl", "experience").host          # level 2 discards them


def test_explicit_kv_cache_and_settings_change_the_timeline():
    cfg = load_config(RECIPES[1], ["rollout.kv_cache_bytes=10737418240"])
    plan = make_plan(cfg, QWEN32B, nodes=8, gpus_per_node=8)
    assert plan.row("rl", "rollout").gpu["vllm.kv_cache"] == 10 * GIB
    kept = make_plan(load_config(RECIPES[1], ["rollout.sleep_level=0", "rollout.kv_cache_bytes=10737418240"]),
                     QWEN32B, nodes=8, gpus_per_node=8)
    assert kept.row("rl", "actor_update").gpu["vllm.kv_cache"] == 10 * GIB      # never sleeps
    with pytest.raises(PlanError, match="phase sync \\(start\\) needs 85.8 GiB .*offload_during_rollout=true"):
        make_plan(load_config(RECIPES[1], ["trainer.offload_during_rollout=false"]), QWEN32B, 8, 8)
    baseline = make_plan(load_config(RECIPES[2]), QWEN32B, 8, 8)
    assert not [r for r in baseline.rows if r.step == "value_pretrain"]       # value_pretrain_steps: 0


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_plan_accepts_the_32b_recipes_on_8x8_h100(recipe):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(recipe),
                          "--nodes", "8", "--gpus-per-node", "8"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "OK: the layout fits" in out.stdout
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step "))
    end = next(i for i, line in enumerate(lines) if line.startswith("  aW="))
    rows = {tuple(line.split()[:2]): line for line in lines[header + 1:end]}
    assert len(rows) == end - header - 1 >= 8, rows
    for key in (("start", "load"), ("start", "startup"), ("rl", "rollout"), ("rl", "experience"),
                ("rl", "actor_update"), ("rl", "critic_update"), ("rl", "sync")):
        total = float(rows[key].split()[-2])
        assert 0 < total < 80.0, rows[key]
    peak = next(line for line in lines if line.startswith("peak: "))
    assert float(peak.split()[1]) < 80.0, peak
    assert "#SBATCH --signal=B:USR1@" in out.stdout


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
    (["actor.parallel.tensor_parallel_size=2"], (8, 8), "[actor TP2 PP1 DP32, critic TP8 PP1 DP8] needs"),
    (["critic.parallel.recompute_activations=none"], (8, 8), "phase critic_update (rl) [critic TP8 PP1 DP8] needs"),
    (["critic.parallel.recompute_activations=none"], (8, 8), "(largest: activations"),
    (["rollout.gpu_memory_utilization=0.45"], (8, 8), "less than one sequence of 21504"),
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
    with pytest.raises(PlanError, match=r"over the 80 GiB of a GPU \(largest: actor.grads"):
        make_plan(cfg, QWEN32B, nodes=8, gpus_per_node=8)
    assert GIB == 2 ** 30


def test_preemption_margin_by_hand():
    """margin = longest step + checkpoint + exit (no periodic evaluation in the VAPO recipe)."""
    cfg = load_config(RECIPES[1])
    actor, critic = (sum(ModelShape.from_hf(QWEN32B).params(lm_head=h)) for h in (True, False))
    m = preemption.preemption_margin(cfg, 64, actor, critic)
    assert m.checkpoint_bytes == (actor + critic) * (2 + 12)                 # ~0.9 TB: bf16 + fp32 Adam state
    assert 0.85e12 < m.checkpoint_bytes < 0.95e12
    step_s = 512 * 16 * (1024 + 20480) / (64 * preemption.TOKENS_PER_S_PER_GPU)
    assert m.step_s == pytest.approx(step_s) and m.eval_s == 0
    total = step_s + m.checkpoint_bytes / preemption.WRITE_BYTES_PER_S + preemption.EXIT_SECONDS
    assert m.seconds == 60 * math.ceil(total / 60) and m.seconds % 60 == 0
    measured = preemption.preemption_margin(cfg, 64, actor, critic, step_seconds=1800, write_bytes_per_s=20e9)
    assert measured.step_s == 1800 and measured.checkpoint_s == pytest.approx(m.checkpoint_bytes / 20e9)
    evals = preemption.preemption_margin(load_config(RECIPES[1], ["trainer.eval_every_steps=10"]), 64, actor, critic)
    assert evals.eval_s == pytest.approx(64 * (32 + 1) * 21504 / (64 * preemption.TOKENS_PER_S_PER_GPU))  # + greedy
    with pytest.raises(ValueError, match="expected positive numbers"):
        preemption.preemption_margin(cfg, 64, actor, critic, write_bytes_per_s=0)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(RECIPES[1]), "--nodes",
                          "8", "--gpus-per-node", "8", "--step-seconds", "1800", "--write-gbps", "20"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"--signal=B:USR1@{measured.seconds}" in out.stdout, out.stdout + out.stderr


# ---- every shipped recipe plans on the hardware it states ---------------------------------------
_STATED = re.compile(r"tools/plan\.py --config examples/(\S+\.yaml) --nodes (\d+) --gpus-per-node (\d+)")


def _plan_tool():
    spec = importlib.util.spec_from_file_location("vcppo_tools_plan", ROOT / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shipped_recipes() -> list[tuple[Path, list[tuple[int, int]]]]:
    """Recipes with a model (not defaults files, not the tiny CPU demo) and the layouts their header states."""
    out = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        if load_config(path).actor.model_path is None:
            continue
        stated = [(int(n), int(g)) for name, n, g in _STATED.findall(path.read_text()) if name == path.name]
        out.append((path, stated))
    return out


def test_every_shipped_recipe_plans_on_its_stated_hardware(capsys):
    """tools/plan.py (in-process) accepts each recipe on each `--nodes N --gpus-per-node G` its header states."""
    plan = _plan_tool()
    recipes = _shipped_recipes()
    names = {p.name for p, _ in recipes}
    assert {f"qwen2.5_{size}_gsm8k_{algo}.yaml" for size in ("0.5b", "1.5b")
            for algo in ("vcppo", "vapo", "ppo_baseline")} | {f"qwen2.5_32b_{a}.yaml" for a in
                                                              ("vcppo", "vapo", "ppo_baseline")} <= names, names
    for path, stated in recipes:
        assert stated, f"{path.name}: states no `tools/plan.py --config examples/{path.name} --nodes N --gpus-per-node G`"
        for nodes, gpus in stated:
            code = plan.main(["--config", str(path), "--nodes", str(nodes), "--gpus-per-node", str(gpus)])
            out = capsys.readouterr()
            assert code == 0 and "OK: the layout fits" in out.out, (path.name, nodes, gpus, out.err)
        if "_gsm8k_" in path.name:
            assert set(stated) == {(1, 8), (1, 1)}, (path.name, stated)
            assert re.search(r"# Time per RL step: (ESTIMATE|measured)", path.read_text()), path.name


@pytest.mark.parametrize("size, published", [("0.5B", 494_032_768), ("1.5B", 1_543_714_304)])
def test_shipped_small_model_configs_have_the_published_size(size, published):
    """examples/models/Qwen2.5-<size>-Instruct/config.json: the plan's count, HF's model and the published size agree."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = ROOT / "examples" / "models" / f"Qwen2.5-{size}-Instruct"
    hf = json.loads((path / "config.json").read_text())
    layers, outer = ModelShape.from_hf(hf).params(lm_head=True)
    assert layers + outer == published
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    assert sum(p.numel() for p in model.parameters()) == published     # tied: the embedding counted once
    assert (hf["vocab_size"], hf["tie_word_embeddings"], hf["eos_token_id"]) == (151936, True, 151645)
