"""Issue 14, items 2 and 5 on one GPU: the colocation hand-over with real bf16 actor and critic
engines and vLLM played by a stand-in that holds CUDA memory (the GPU machine has no vLLM).

- In every phase of the memory timeline the CUDA memory allocated equals the timeline's resident
  parts, priced from the engines' own tensors (and the stand-in's).
- vLLM starts, and wakes for each sync, only after the engines have released their gradients and
  optimizer state and PyTorch's cache has been emptied (memory allocated and cached bytes left,
  measured at the moment it allocates).
- The one-GPU recipes' KV cache and vLLM's share, sized from this GPU's memory, fit it.
The CPU proofs: tests/unit/test_colocation.py (the trainer's calls walked against the timeline).
"""
from __future__ import annotations

import pytest
import torch

from cuda_utils import cuda_policy as _cuda_policy
from cuda_utils import cuda_role  # noqa: F401  (fixture)
from test_engines import _batch, part_bytes

pytestmark = pytest.mark.gpu


class _SleepyVLLM:
    """vLLM's memory behaviour on one GPU: its weights and KV cache are CUDA tensors, freed when it
    sleeps (any level: the test's sync refills the weights) and allocated again when it wakes. At
    its start and at every wake it records what PyTorch had allocated then and the bytes PyTorch's
    cache still held unused (real vLLM maps memory outside that cache, so cached bytes are lost to
    it): the colocation code must release and empty the cache before vLLM allocates."""

    def __init__(self, sizes: dict[str, int], seen: list) -> None:
        self.sizes, self.seen, self.held = sizes, seen, {}
        self._record(("vllm.weights", "vllm.kv_cache"))

    def _record(self, parts) -> None:
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.empty_cache()                  # what an emptied cache would have given back
        self.seen.append((tuple(parts), allocated, reserved - torch.cuda.memory_reserved()))
        for p in parts:
            self.held[p] = torch.empty(self.sizes[p], dtype=torch.uint8, device="cuda")

    def sleep(self, level: int = 1) -> bool:
        self.held.clear()
        return True

    def wake_up(self, tags=None) -> bool:
        self._record(("vllm.weights", "vllm.kv_cache") if tags is None else tuple(f"vllm.{t}" for t in tags))
        return True


def test_colocation_on_cuda_frees_what_the_timeline_says(cuda_role):
    """Issue 14, items 2 and 5, with real bf16 engines on the GPU: the trainer's colocation calls
    (start-up, first sync, an RL step, a sync) leave in every phase exactly the timeline's parts
    allocated; vLLM starts (item 2) and wakes for each sync (item 5) only after the engines have
    released their gradients and optimizer state and PyTorch's cache has been emptied."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import ValueEngine
    from vcppo_megatron.parallel.memory_timeline import ENGINE_PARTS, ROLES, Timeline
    from vcppo_megatron.trainer.colocation import Colocation

    torch.manual_seed(0)                          # ~9M parameters: ~100 MB of optimizer state to move
    hf = Qwen2ForCausalLM(Qwen2Config(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      architectures=["Qwen2ForCausalLM"])).float().eval()
    pgs, layout = cuda_role
    critic = ValueEngine(hf.config, pgs, layout, optim=OptimConfig(lr=1e-3), params_dtype=torch.bfloat16)
    critic.load_hf_state({k: v.cuda() for k, v in hf.state_dict().items()}, init_from="policy")
    engines = {"actor": _cuda_policy(cuda_role, hf, params_dtype=torch.bfloat16), "critic": critic}
    for eng in engines.values():                  # one step: Adam's moments exist
        eng.zero_grad()
        with eng.train_mode():
            eng.forward_backward(_batch(), lambda o, mb: (sum(v.float().sum() for v in o.values()) * 0.0, {}))
        eng.step()
    sizes = {f"{r}.{p}": b for r in ROLES for p, b in part_bytes(engines[r]).items()}
    engine_bytes = sum(sizes.values())
    sizes.update({"vllm.weights": sizes["actor.weights"], "vllm.kv_cache": 32 << 20})
    timeline = Timeline(sleep_level=2, offload=True, optimizer_to_host=(True, True))
    col = Colocation(timeline, engines)

    def held() -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    base = held() - engine_bytes                  # everything resident at load, no vLLM yet
    slack = 0.005 * sum(sizes.values()) + (64 << 10)
    seen, vllm_seen = {}, []

    def check(phase: str) -> None:
        want = base + sum(sizes[p] for p in timeline.resident(phase))
        seen[phase] = held()
        assert abs(seen[phase] - want) <= slack, (phase, seen[phase], want)

    col.start_rollout(lambda: _SleepyVLLM(sizes, vllm_seen))
    check("startup")
    col.sync(lambda: check("sync") or 0.0)
    check("rollout")
    col.after_rollout(weights_change=True)
    check("experience")
    for role in ROLES:
        col.updating(role)
        check(f"{role}_update")
    col.sync(lambda: check("sync") or 0.0)
    check("rollout")
    # vLLM allocated in these phases, in this order (start-up; each sync: weights, then KV cache)
    targets = ["startup", "sync", "rollout", "sync", "rollout"]
    assert [parts for parts, _, _ in vllm_seen] == [("vllm.weights", "vllm.kv_cache"), ("vllm.weights",),
                                                    ("vllm.kv_cache",), ("vllm.weights",), ("vllm.kv_cache",)]
    for phase, (parts, allocated, cached) in zip(targets, vllm_seen):
        want = base + sum(sizes[p] for p in timeline.resident(phase) if p not in parts)
        assert abs(allocated - want) <= slack, ("engines not released before vLLM allocated", phase, parts,
                                                allocated, want)
        assert cached <= 2 << 20, ("PyTorch's cache not emptied before vLLM allocated", phase, parts, cached)
    released = sum(sizes[f"{r}.{p}"] for r in ROLES for p in ENGINE_PARTS if p != "weights")
    print(f"colocation on CUDA: {released / 2**20:.2f} MiB of gradients and optimizer state released "
          f"outside the updates; held per phase (MiB): "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in seen.items())
          + "; unused cached bytes when vLLM allocated: " + ", ".join(str(c) for _, _, c in vllm_seen))


def test_start_up_sizes_the_kv_cache_from_this_gpu():
    """Issue 14, item 2 on the real device: the one-GPU recipes' KV cache and vLLM's share come from
    the memory timeline priced against this GPU's total memory (no monkeypatched CUDA queries)."""
    import json
    from pathlib import Path

    from vcppo_megatron.config import load_config
    from vcppo_megatron.parallel.memory_plan import timeline_plan
    from vcppo_megatron.trainer.colocation import rollout_memory

    root = Path(__file__).resolve().parents[2]
    total = torch.cuda.mem_get_info()[1]
    for size in ("0.5b", "1.5b"):
        cfg = load_config(root / "examples" / f"qwen2.5_{size}_gsm8k_vcppo.yaml")
        hf_config = json.loads((root / "examples" / "models" / f"Qwen2.5-{size.upper()}-Instruct"
                                / "config.json").read_text())
        rollout, share, line = rollout_memory(cfg, hf_config, world=1)
        print(line)
        assert rollout.kv_cache_bytes > 0 and 0.0 < share <= cfg.rollout.gpu_memory_utilization, (size, share)
        assert rollout.kv_cache_bytes < share * total, (size, rollout.kv_cache_bytes, share)
        peak = timeline_plan(cfg, hf_config, 1, float(total)).peak
        assert peak.total < total, (size, peak.phase, peak.total, total)
