"""Megatron GPTModel from converted HF weights on 2 gloo ranks: TP=2 and PP=2 logits equal HF's
(tied Qwen2, untied Qwen2, Llama-3). All checks share this one spawn."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dist_utils import run_gloo
from model_fixtures import tiny_batch, tiny_hf_model

TOL = 1e-4
MODELS = ("qwen2_tied", "qwen2_untied", "llama3")


def _check_tp2(rank: int, name: str) -> float:
    """TP=2: each rank loads its shard; gathered logits equal HF's."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from vcppo_megatron.checkpoint import hf_to_megatron, load_into_model, tp_shard
    from vcppo_megatron.models import build_gpt_model

    hf = tiny_hf_model(name)
    c = hf.config
    ids, pos = tiny_batch()
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    try:
        model = build_gpt_model(c, tensor_model_parallel_size=2, parallel_output=False,
                                attention_backend="sdpa").eval()
        full = hf_to_megatron(hf.state_dict(), num_heads=c.num_attention_heads,
                              num_query_groups=c.num_key_value_heads,
                              tie_word_embeddings=c.tie_word_embeddings)
        load_into_model(model, {k: tp_shard(k, v, tp_rank=rank, tp_size=2,
                                            num_query_groups=c.num_key_value_heads)
                                for k, v in full.items()})
        with torch.no_grad():
            diff = float((model(ids, pos, None) - hf(input_ids=ids).logits).abs().max())
    finally:
        ps.destroy_model_parallel()
    return diff


def _check_pp2(rank: int, name: str) -> float | None:
    """PP=2: stage 0 (embedding + layer 0) sends hidden states to stage 1 (layer 1 + head).

    Returns the logits diff on the last stage, None on the first."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from vcppo_megatron.checkpoint import hf_to_megatron, load_into_model, pp_stage
    from vcppo_megatron.models import build_gpt_model

    hf = tiny_hf_model(name)
    c = hf.config
    ids, pos = tiny_batch()
    first, last = rank == 0, rank == 1
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    model_parallel_cuda_manual_seed(0)
    try:
        model = build_gpt_model(c, pipeline_model_parallel_size=2, pre_process=first,
                                post_process=last, attention_backend="sdpa").eval()
        full = hf_to_megatron(hf.state_dict(), num_heads=c.num_attention_heads,
                              num_query_groups=c.num_key_value_heads,
                              tie_word_embeddings=c.tie_word_embeddings)
        load_into_model(model, pp_stage(full, layers=[rank], pre_process=first, post_process=last,
                                         tie_word_embeddings=c.tie_word_embeddings))
        group = ps.get_pipeline_model_parallel_group()
        diff = None
        with torch.no_grad():
            if first:
                dist.send(model(ids, pos, None).contiguous(), group_dst=1, group=group)
            else:
                hidden = torch.empty(ids.shape[1], ids.shape[0], c.hidden_size)   # [s, b, h]
                dist.recv(hidden, group_src=0, group=group)
                model.set_input_tensor(hidden)
                diff = float((model(ids, pos, None) - hf(input_ids=ids).logits).abs().max())
    finally:
        ps.destroy_model_parallel()
    return diff


def _worker(rank: int, world_size: int) -> None:
    from vcppo_megatron.platform import setup_device

    setup_device()
    for name in MODELS:
        tp, pp = _check_tp2(rank, name), _check_pp2(rank, name)
        print(f"rank {rank} {name}: max |logits - HF| TP=2 {tp:.3g}  PP=2 {pp}", flush=True)
        assert tp <= TOL, (rank, name, tp)
        assert (pp is None) == (rank == 0) and (pp is None or pp <= TOL), (rank, name, pp)


def test_tp2_and_pp2_logits_match_hf():
    run_gloo(_worker, 2)
