"""torchrun worker of test_weight_sync.test_sync_into_rollout_tp2: one vLLM engine with tensor
parallel size 2 spanning both ranks (vLLM's external launcher, as the trainer runs it), fed by the
PP=2 tied actor of test_weight_sync's `_pp2_phase`, with the same parity checks after each sync."""
from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from test_weight_sync import MAX_PROMPT, MAX_RESPONSE, _pp2_phase  # noqa: E402


def main(tied_dir: str) -> None:
    from vcppo_megatron.config.schema import RolloutConfig
    from vcppo_megatron.data.synthetic import build_tokenizer
    from vcppo_megatron.platform import setup_device
    from vcppo_megatron.rollout import RolloutEngine

    setup_device()
    dist.init_process_group("gloo")
    tok = build_tokenizer()
    config = RolloutConfig(temperature=1.0, top_p=1.0, max_prompt_tokens=MAX_PROMPT,
                           max_response_tokens=MAX_RESPONSE, dtype="float32", kv_cache_bytes=8 << 20,
                           tensor_parallel_size=2)
    # one engine over both ranks: every rank passes the same seed and gets the same samples
    engine = RolloutEngine(tied_dir, config, seed=300, pad_token_id=tok.pad_token_id)
    _pp2_phase(dist.get_rank(), engine, Path(tied_dir), tok)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
