"""One task of test_srun_rollout: started with only srun's SLURM_* variables (no RANK / LOCAL_RANK /
WORLD_SIZE / MASTER_*), it initialises torch.distributed through `init_distributed`, then builds a
rollout engine at tensor_parallel_size 2 and at 1 and prints what vLLM's executor was given."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from test_weight_sync import MAX_PROMPT, MAX_RESPONSE, prompts_of  # noqa: E402


def _drop_vllm_groups() -> None:
    """Forget vLLM's process groups (not torch's default group) so the next engine starts clean."""
    from vllm.distributed import parallel_state as vps

    vps.destroy_model_parallel()
    if vps._WORLD is not None:
        vps._WORLD.destroy()
    vps._WORLD, vps._NODE_COUNT = None, None


def main(model_dir: str) -> None:
    before = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    from vcppo_megatron.config.schema import RolloutConfig
    from vcppo_megatron.data.synthetic import build_tokenizer
    from vcppo_megatron.parallel.launch import init_distributed
    from vcppo_megatron.platform import setup_device
    from vcppo_megatron.rollout import RolloutEngine

    launch = init_distributed(timeout_s=120)
    setup_device(launch.local_rank)
    tok = build_tokenizer()
    results = []
    for tp in (2, 1):
        config = RolloutConfig(max_prompt_tokens=MAX_PROMPT, max_response_tokens=MAX_RESPONSE, dtype="float32",
                               kv_cache_bytes=8 << 20, tensor_parallel_size=tp)
        engine = RolloutEngine(model_dir, config, seed=5, pad_token_id=tok.pad_token_id)
        from vllm.distributed.parallel_state import get_tp_group

        executor = engine._llm.llm_engine.model_executor
        worker = executor.driver_worker.worker
        greedy = engine.generate(prompts_of(tok)[:2], n=1, greedy=True)
        results.append(dict(tp=tp, executor=type(executor).__name__, local_rank=worker.local_rank,
                            rank=worker.rank, vllm_tp=get_tp_group().world_size,
                            tokens=greedy.response_token_ids))
        del engine, executor, worker
        _drop_vllm_groups()
    print("RESULT " + json.dumps(dict(launch=[launch.launcher, launch.rank, launch.local_rank],
                                      env_before=before, engines=results)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
