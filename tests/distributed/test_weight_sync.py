"""Weight sync from a Megatron actor on 2 gloo ranks into each rank's in-process vLLM engine
(rollout TP=1), all in ONE spawn:

- TP=2 (untied Qwen2, Megatron vocabulary padded 19 -> 20): 4 syncs, 3 SGD steps between them.
- PP=2 (tied Qwen2: the lm_head lives on the first stage's embedding): 2 syncs, a weight change
  between them applied to both stages as Megatron's tied-embedding gradient sum would.

After every sync: vLLM's processed log-probs of its own samples (T=1, top_p=1) equal the actor's
recomputed log_softmax within 1e-4 (fp32); vLLM's greedy tokens equal HF transformers' greedy
tokens with the synced weights; and the previous rollout's log-probs are off by > 1e-3 under the
new actor, so a stale engine would fail the parity check.

`test_sync_into_rollout_tp2` runs the PP=2 part again under torchrun against ONE vLLM engine of
tensor-parallel size 2 over both ranks (rollout_tp2_worker.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dist_utils import run_gloo

TOL = 1e-4
STALE = 1e-3
MAX_PROMPT, MAX_RESPONSE = 8, 12
BUCKET = 128 << 10                # bytes: ~8 buckets (largest tensor 192 x 128 x 4 = 96 KiB)
PAD_VOCAB = 1                     # Megatron's TP=2 vocabulary: 19 + 1 rows


def build_hf_dir(path, tied: bool, seed: int):
    """Save a tiny fp32 Qwen2 (head_dim 32, 2 query groups) with the synthetic tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vcppo_megatron.data.synthetic import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied, initializer_range=0.2, torch_dtype="float32",
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():                                  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def prompts_of(tok) -> list[list[int]]:
    """Four short prompts of the synthetic task."""
    return [tok(t)["input_ids"] for t in ("1+2=", "34+5=", "9-9=", "70-7=")]


def hf_from_buckets(buckets, config):
    """An HF model holding exactly the synced tensors (strict load; a tied lm_head re-tied)."""
    from transformers import Qwen2ForCausalLM

    from vcppo_megatron.rollout.sync import iter_bucket_tensors

    state = {n: t.clone() for n, t in iter_bucket_tensors(buckets)}
    model = Qwen2ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings
                                               else set()), (missing, unexpected)
    return model


def hf_greedy(model, prompt: list[int]) -> list[int]:
    """HF greedy continuation (stops after the end-of-sequence token, which it keeps)."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_RESPONSE,
                             do_sample=False,
                             eos_token_id=model.config.eos_token_id,
                             pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


def padded(seqs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [b, s] right-padded, position ids) of prompt + response sequences."""
    length = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
    return ids, torch.arange(length)[None].expand(len(seqs), -1)


def response_logprobs(logits: torch.Tensor, seqs, vocab: int) -> list[torch.Tensor]:
    """log_softmax over the HF vocabulary (Megatron's padded rows dropped) of response tokens."""
    lp = torch.log_softmax(logits[..., :vocab].double(), dim=-1)
    out = []
    for i, (p, r) in enumerate(seqs):
        pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        out.append(lp[i, pos, torch.tensor(r)])
    return out


def all_samples(batch) -> list[tuple[list[int], list[int]]]:
    """Every rank's (prompt, response) samples, rank order (each rank's engine sampled its own)."""
    mine = [(p, r) for p, r in zip(batch.prompt_token_ids, batch.response_token_ids)]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [s for rank_samples in gathered for s in rank_samples]


def max_error(mine, batch, actor_lp) -> float:
    """max |vLLM log-prob - actor log-prob| over this rank's samples (`mine`: their offset)."""
    worst = 0.0
    for i in range(batch.num_samples):
        n = len(batch.response_token_ids[i])
        worst = max(worst, float((batch.rollout_logprobs[i, :n].double() - actor_lp[mine + i])
                                 .abs().max()))
    return worst


def check_sync(rank, engine, make_buckets, hf_config, tok, actor_logprobs, label, previous):
    """Sync, then the parity checks; returns (this sync's batch and samples) for the next call."""
    from vcppo_megatron.rollout.sync import SyncStats, sync_to_rollout

    stats = SyncStats()
    seconds = sync_to_rollout(engine, make_buckets(stats))
    assert stats.num_buckets >= 3 and stats.max_bucket_bytes <= BUCKET, stats
    prompts = prompts_of(tok)
    batch = engine.generate(prompts, n=2, logprobs=True)
    samples = all_samples(batch)
    offset = rank * len(prompts) * 2
    lp = actor_logprobs(samples)
    err = max_error(offset, batch, lp)
    hf = hf_from_buckets(make_buckets(SyncStats()), hf_config)
    greedy = engine.generate(prompts, n=1, greedy=True)
    same = [greedy.response_token_ids[i] == hf_greedy(hf, p) for i, p in enumerate(prompts)]
    stale = None
    if previous is not None:                          # old rollout vs new actor: must be far off
        prev_batch, prev_samples = previous
        stale = max_error(offset, prev_batch, actor_logprobs(prev_samples))
    print(f"rank {rank} {label}: sync {seconds * 1e3:.0f} ms, {stats.num_buckets} buckets; "
          f"max |dlogprob| {err:.2e}; greedy == HF {sum(same)}/{len(same)}; stale {stale}",
          flush=True)
    assert err <= TOL, (label, err)
    assert all(same), (label, same)
    assert stale is None or stale > STALE, (label, stale)
    return batch, samples


def _tp2_phase(rank, engine, hf_dir, tok) -> None:
    """TP=2 untied actor with padded vocabulary: 4 syncs around 3 SGD steps."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from transformers import AutoConfig, AutoModelForCausalLM

    from vcppo_megatron.checkpoint import hf_to_megatron, load_into_model, tp_shard
    from vcppo_megatron.models import build_gpt_model
    from vcppo_megatron.rollout.sync import hf_weight_buckets

    hf_config = AutoConfig.from_pretrained(hf_dir)
    actor_hf = AutoModelForCausalLM.from_pretrained(hf_dir / "actor")    # not vLLM's weights
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_cuda_manual_seed(0)
    try:
        tp_group = ps.get_tensor_model_parallel_group()
        c = hf_config
        model = build_gpt_model(c.to_dict() | {"vocab_size": c.vocab_size + PAD_VOCAB},
                                tensor_model_parallel_size=2, attention_backend="sdpa")
        full = hf_to_megatron(actor_hf.state_dict(), num_heads=c.num_attention_heads,
                              num_query_groups=c.num_key_value_heads, tie_word_embeddings=False)
        pad_rows = torch.randn(PAD_VOCAB, c.hidden_size, generator=torch.Generator().manual_seed(3))
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            full[name] = torch.cat([full[name], pad_rows])
        load_into_model(model, {k: tp_shard(k, v, tp_rank=rank, tp_size=2,
                                            num_query_groups=c.num_key_value_heads)
                                for k, v in full.items()})

        def make_buckets(stats):
            return hf_weight_buckets(model, c, bucket_bytes=BUCKET, tp_group=tp_group, stats=stats)

        def actor_logprobs(samples):
            ids, pos = padded(samples)
            with torch.no_grad():
                local = model(ids, pos, None)                       # [b, s, vocab / 2]
            shards = [torch.empty_like(local) for _ in range(2)]
            dist.all_gather(shards, local.contiguous(), group=tp_group)
            return response_logprobs(torch.cat(shards, dim=-1), samples, c.vocab_size)

        previous = None
        for step in range(4):
            previous = check_sync(rank, engine, make_buckets, c, tok, actor_logprobs,
                                  f"TP=2 step {step}", previous)
            if step == 3:
                break
            ids, pos = padded(previous[1])                   # SGD on the LM loss of the samples
            labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
            model.zero_grad(set_to_none=True)
            model(ids, pos, None, labels=labels).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.5 * p.grad)
    finally:
        ps.destroy_model_parallel()


def _pp2_phase(rank, engine, hf_dir, tok) -> None:
    """PP=2 tied actor: stage 0 holds the embedding (and the tied lm_head), stage 1 its copy."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from transformers import AutoConfig, AutoModelForCausalLM

    from vcppo_megatron.checkpoint import hf_to_megatron, load_into_model, pp_stage
    from vcppo_megatron.models import build_gpt_model
    from vcppo_megatron.rollout.sync import hf_weight_buckets

    c = AutoConfig.from_pretrained(hf_dir)
    actor_hf = AutoModelForCausalLM.from_pretrained(hf_dir / "actor")
    first, last = rank == 0, rank == 1
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    model_parallel_cuda_manual_seed(0)
    try:
        pp_group = ps.get_pipeline_model_parallel_group()
        model = build_gpt_model(c, pipeline_model_parallel_size=2, pre_process=first,
                                post_process=last, attention_backend="sdpa").eval()
        full = hf_to_megatron(actor_hf.state_dict(), num_heads=c.num_attention_heads,
                              num_query_groups=c.num_key_value_heads, tie_word_embeddings=True)
        load_into_model(model, pp_stage(full, layers=[rank], pre_process=first, post_process=last,
                                         tie_word_embeddings=True))

        def make_buckets(stats):
            return hf_weight_buckets([model], c, bucket_bytes=BUCKET, pp_group=pp_group,
                                     stats=stats)

        def actor_logprobs(samples):
            ids, pos = padded(samples)
            result: list = [None]
            with torch.no_grad():
                if first:
                    dist.send(model(ids, pos, None).contiguous(), group_dst=1, group=pp_group)
                else:
                    hidden = torch.empty(ids.shape[1], ids.shape[0], c.hidden_size)
                    dist.recv(hidden, group_src=0, group=pp_group)
                    model.set_input_tensor(hidden)
                    result[0] = response_logprobs(model(ids, pos, None), samples, c.vocab_size)
            dist.broadcast_object_list(result, group_src=1, group=pp_group)
            return result[0]

        previous = check_sync(rank, engine, make_buckets, c, tok, actor_logprobs, "PP=2 sync 0",
                              None)
        gen = torch.Generator().manual_seed(11)                  # same draws on both stages
        delta = 0.3 * torch.randn(c.vocab_size, c.hidden_size, generator=gen)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    p.add_(delta)                                # the tied pair stays equal
                else:
                    gen_p = torch.Generator().manual_seed(rank)
                    p.add_(0.1 * torch.randn(p.shape, generator=gen_p))
        check_sync(rank, engine, make_buckets, c, tok, actor_logprobs, "PP=2 sync 1", previous)
    finally:
        ps.destroy_model_parallel()


def _worker(rank: int, world_size: int, untied_dir, tied_dir) -> None:
    from vcppo_megatron.config.schema import RolloutConfig
    from vcppo_megatron.data.synthetic import build_tokenizer
    from vcppo_megatron.platform import setup_device
    from vcppo_megatron.rollout import RolloutEngine

    setup_device()
    tok = build_tokenizer()
    config = RolloutConfig(temperature=1.0, top_p=1.0, max_prompt_tokens=MAX_PROMPT,
                           max_response_tokens=MAX_RESPONSE, dtype="float32",
                           kv_cache_bytes=8 << 20)
    untied = RolloutEngine(untied_dir, config, seed=100 + rank, pad_token_id=tok.pad_token_id)
    tied = RolloutEngine(tied_dir, config, seed=200 + rank, pad_token_id=tok.pad_token_id)
    _tp2_phase(rank, untied, untied_dir, tok)
    _pp2_phase(rank, tied, tied_dir, tok)


def test_sync_tp2_pp2_three_steps(tmp_path):
    dirs = []
    for tied in (False, True):
        path = tmp_path / ("tied" if tied else "untied")
        build_hf_dir(path, tied, seed=1)                  # what vLLM starts with
        build_hf_dir(path / "actor", tied, seed=2)        # what the actor holds: differs
        dirs.append(path)
    run_gloo(_worker, 2, *dirs)


def test_sync_into_rollout_tp2(tmp_path):
    """Rollout TP=2 (one vLLM engine over both ranks, external launcher under torchrun) fed by a
    PP=2 tied actor: the same parity checks after each of two syncs (run by rollout_tp2_worker.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    build_hf_dir(tmp_path / "tied", True, seed=1)
    build_hf_dir(tmp_path / "tied" / "actor", True, seed=2)
    worker = Path(__file__).with_name("rollout_tp2_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), str(tmp_path / "tied")], capture_output=True, text=True, timeout=600,
                          env=env, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in (0, 1):
        for label in ("PP=2 sync 0", "PP=2 sync 1"):
            assert f"rank {rank} {label}:" in proc.stdout, proc.stdout[-3000:]
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("rank ")))
