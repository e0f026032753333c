"""Engines on one gloo rank (TP=1): policy log-probs / entropy and their gradients equal HF's;
critic values from a reward model equal HF's per-token scores; the micro-batch padding bound;
clear errors for bad input."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dist_utils import one_gloo_rank
from model_fixtures import VOCAB, tiny_hf_model
from vcppo_megatron.config.schema import OptimConfig
from vcppo_megatron.engines import (PolicyEngine, ValueEngine, computed_tokens, split_micro_batches,
                                    vocab_parallel_logprobs)

TOL = 1e-5
CHUNK = 5                       # smaller than the tokens of any micro-batch below


@pytest.fixture(scope="module")
def role():
    """One gloo rank and its (TP=1, PP=1, DP=1) process groups."""
    from vcppo_megatron.parallel.groups import build_role_groups

    with one_gloo_rank():
        yield build_role_groups(1, 1)


def _batch(rows: int = 5, seq: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of varying length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (rows,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask,
            "w_lp": torch.randn(rows, seq, generator=g), "w_ent": torch.randn(rows, seq, generator=g)}


def _hf_per_token(hf, batch):
    """HF log p(token t | < t) and entropy at t (aligned like the engine's outputs; 0 at t=0)."""
    ids = batch["input_ids"]
    logp_all = torch.log_softmax(hf(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float(), -1)
    lp = logp_all[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)[:, :-1]
    zero = lp.new_zeros(ids.shape[0], 1)
    return torch.cat([zero, lp], 1), torch.cat([zero, ent], 1)


def _loss(lp, ent, mb):
    """A loss using both outputs with arbitrary per-token weights (masked)."""
    m = mb["attention_mask"].float()
    m = torch.cat([torch.zeros_like(m[:, :1]), m[:, 1:]], 1)
    return ((lp * mb["w_lp"] + ent * mb["w_ent"]) * m).sum() / 20.0


def _policy(role, hf, **kw):
    pgs, layout = role
    eng = PolicyEngine(hf.config, pgs, layout, optim=OptimConfig(lr=1e-3), logprob_chunk_size=CHUNK,
                       attention_backend="sdpa", **kw)
    eng.load_hf_state(hf.state_dict())
    return eng


@pytest.mark.parametrize("name", ("qwen2_tied", "qwen2_untied"))
def test_policy_logprobs_and_grads_match_hf(role, name):
    hf = tiny_hf_model(name)
    batch = _batch()
    eng = _policy(role, hf, max_tokens_per_micro_batch=16)       # several micro-batches
    with eng.eval_mode():
        out = eng.forward_backward(batch, None, forward_only=True)
    assert out["num_micro_batches"] >= 3
    ref_lp, ref_ent = _hf_per_token(hf, batch)
    valid = batch["attention_mask"].bool()
    lp, ent = out["outputs"]["log_probs"], out["outputs"]["entropy"]
    d_lp, d_ent = float((lp - ref_lp)[valid].abs().max()), float((ent - ref_ent)[valid].abs().max())
    assert torch.equal(lp[~valid], torch.zeros_like(lp[~valid]))

    # gradients of a loss through log-probs and entropy vs HF autograd (converted to Megatron names)
    hf.zero_grad()
    ref_lp, ref_ent = _hf_per_token(hf, batch)
    _loss(ref_lp, ref_ent, batch).backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    if hf.config.tie_word_embeddings:
        hf_grads.pop("lm_head.weight", None)
    ref_grads = eng.core.hf_full_state(hf_grads, tie_word_embeddings=hf.config.tie_word_embeddings)
    eng.zero_grad()
    shapes = []

    def loss_fn(o, mb):
        shapes.append((tuple(mb["input_ids"].shape), int(mb["attention_mask"].sum(-1).max())))
        return _loss(o["log_probs"], o["entropy"], mb), {}

    with eng.train_mode():
        eng.forward_backward(batch, loss_fn)
    # the engine feeds each micro-batch trimmed to its longest row, within the token budget
    assert all(s[1] == longest and (s[0] * s[1] <= 16 or s[0] == 1) for s, longest in shapes), shapes
    assert sum(s[0] for s, _ in shapes) == batch["input_ids"].shape[0]
    got = eng.core.main_grads()
    assert set(got) == set(ref_grads)
    d_grad = max(float((got[k] - ref_grads[k]).abs().max()) for k in got)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    print(f"{name}: |logp - HF| {d_lp:.2e}  |H - HF| {d_ent:.2e}  |grad - HF| {d_grad:.2e} "
          f"(max |grad| {scale:.2e})")
    assert max(d_lp, d_ent, d_grad) <= TOL
    stats = eng.step()
    assert stats["stepped"] and stats["lr"] == 1e-3 and abs(stats["grad_norm"] - float(
        torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())))) <= 1e-4


def test_chunked_function_matches_dense_with_tp_shards():
    """The autograd Function on vocab shards (no group: a single shard) equals dense autograd."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (13,), generator=g)
    lp, ent = vocab_parallel_logprobs(h, w, t, chunk_size=4)
    (lp.sum() + 0.7 * ent.sum()).backward()
    got = (lp.detach(), ent.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    la = torch.log_softmax(h @ w.t(), -1)
    ref_lp, ref_ent = la.gather(-1, t[:, None])[:, 0], -(la.exp() * la).sum(-1)
    (ref_lp.sum() + 0.7 * ref_ent.sum()).backward()
    for a, b in zip(got, (ref_lp, ref_ent, h.grad, w.grad)):
        assert float((a - b).abs().max()) <= 1e-6


def test_value_from_reward_model_matches_hf_scores(role):
    from transformers import Qwen2ForSequenceClassification

    pgs, layout = role
    lm = tiny_hf_model("qwen2_untied")
    cfg = lm.config.to_dict()
    cfg.update(num_labels=1, architectures=["Qwen2ForSequenceClassification"], pad_token_id=0)
    rm_cfg = type(lm.config).from_dict(cfg)
    torch.manual_seed(5)
    rm = Qwen2ForSequenceClassification(rm_cfg).float().eval()
    rm.model.load_state_dict(lm.model.state_dict())
    batch = _batch(seed=2)
    mask = batch["attention_mask"].bool()     # HF pools at the last token != pad_token_id (0)
    batch["input_ids"] = torch.where(mask, batch["input_ids"].clamp(min=1), 0)
    eng = ValueEngine(rm.config, pgs, layout, optim=OptimConfig(lr=1e-3), attention_backend="sdpa",
                      max_tokens_per_micro_batch=24)
    eng.load_hf_state(rm.state_dict(), init_from="reward_model")
    with eng.eval_mode():
        values = eng.forward_backward(batch, None, forward_only=True)["outputs"]["values"]
        hidden = rm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref = rm.score(hidden)[..., 0]
    valid = batch["attention_mask"].bool()
    diff = float((values - ref)[valid].abs().max())
    print(f"|values - HF reward-model scores| {diff:.2e}")
    assert diff <= TOL and float(ref.abs().max()) > 0.1
    # the sequence score HF reports is the per-token score at the last non-pad token
    with torch.no_grad():
        seq_scores = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    last = valid.long().sum(-1) - 1
    last_values = values.gather(1, last[:, None])[:, 0]
    assert float((last_values - seq_scores).abs().max()) <= TOL

    critic = ValueEngine(lm.config, pgs, layout, optim=OptimConfig(lr=1e-3), attention_backend="sdpa")
    critic.load_hf_state(lm.state_dict(), init_from="policy")              # head starts at zero
    with critic.eval_mode():
        assert torch.equal(critic.forward_backward(batch, None, forward_only=True)["outputs"]["values"],
                           torch.zeros_like(values))


def test_micro_batch_padding_bound():
    g = torch.Generator().manual_seed(7)
    rows, seq, budget = 37, 50, 120
    lengths = torch.randint(1, seq + 1, (rows,), generator=g)
    lengths[3] = seq
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    batch = {"input_ids": torch.zeros(rows, seq, dtype=torch.long), "attention_mask": mask,
             "per_row": torch.arange(rows)}
    mbs = split_micro_batches(batch, budget)
    seen = torch.cat([mb.rows for mb in mbs])
    assert sorted(seen.tolist()) == list(range(rows))                      # every row exactly once
    for mb in mbs:
        row_lens = lengths[mb.rows]
        assert mb.seq_len == int(row_lens.max())                           # trimmed to its longest row
        assert len(mb.rows) * mb.seq_len <= budget or len(mb.rows) == 1
        assert mb.data["input_ids"].shape == (len(mb.rows), mb.seq_len)
        assert torch.equal(mb.data["per_row"], mb.rows)
    padding = computed_tokens(mbs) - int(lengths.sum())
    bound = max(len(mb.rows) for mb in mbs) * int(lengths.max() - lengths.min())
    print(f"padding {padding} tokens of {int(lengths.sum())} (bound {bound}; unsorted full batch "
          f"would pad {rows * seq - int(lengths.sum())})")
    assert padding <= bound
    assert padding < rows * seq - int(lengths.sum())


def test_micro_batches_padded_to_a_multiple_for_sequence_parallelism():
    """seq_multiple m: each micro-batch's width is its longest row rounded up to a multiple of m,
    zero-padded past the batch's own width; the extra padding is < m columns per micro-batch."""
    lengths = torch.tensor([7, 3, 6, 1, 5])
    seq = 7
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = torch.arange(1, 5 * seq + 1).reshape(5, seq) * mask
    batch = {"input_ids": ids, "attention_mask": mask, "w": mask.float() * 2, "per_row": torch.arange(5)}
    plain, padded = split_micro_batches(batch, 14), split_micro_batches(batch, 14, seq_multiple=4)
    assert [mb.rows.tolist() for mb in plain] == [mb.rows.tolist() for mb in padded]
    for a, b in zip(plain, padded):
        assert b.seq_len % 4 == 0 and a.seq_len <= b.seq_len < a.seq_len + 4
        for key in ("input_ids", "attention_mask", "w"):
            assert b.data[key].shape == (len(b.rows), b.seq_len)
            assert torch.equal(b.data[key][:, :a.seq_len], a.data[key])
            assert not b.data[key][:, a.seq_len:].any()                      # zeros: masked out
        assert torch.equal(b.data["per_row"], a.data["per_row"])
    assert padded[0].seq_len == 8 > seq                                     # past the batch width
    assert computed_tokens(padded) - computed_tokens(plain) <= sum(len(mb.rows) * 3 for mb in padded)
    with pytest.raises(ValueError, match="seq_multiple=0"):
        split_micro_batches(batch, 14, seq_multiple=0)


def test_bad_input_raises_clear_errors(role):
    batch = _batch()
    with pytest.raises(KeyError, match="attention_mask"):
        split_micro_batches({"input_ids": batch["input_ids"]}, 10)
    with pytest.raises(ValueError, match=r"input_ids.*\[rows, seq\]"):
        split_micro_batches({"input_ids": batch["input_ids"][0], "attention_mask": batch["attention_mask"][0]}, 10)
    with pytest.raises(ValueError, match="expected 5 rows"):
        split_micro_batches(dict(batch, w_lp=batch["w_lp"][:3]), 10)
    left = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="not right-padded"):
        split_micro_batches(dict(batch, attention_mask=left), 10)
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=0"):
        split_micro_batches(batch, 0)
    with pytest.raises(ValueError, match="chunk_size=0"):
        vocab_parallel_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), chunk_size=0)
    pgs, layout = role
    hf = tiny_hf_model("qwen2_tied")
    eng = _policy(role, hf)
    with pytest.raises(ValueError, match="loss_fn=None"):
        eng.forward_backward(batch, None, forward_only=False)
    critic = ValueEngine(hf.config, pgs, layout, optim=OptimConfig(), attention_backend="sdpa")
    with pytest.raises(KeyError, match="score.weight"):
        critic.load_hf_state(hf.state_dict(), init_from="reward_model")
    with pytest.raises(ValueError, match="init_from='sft'"):
        critic.load_hf_state(hf.state_dict(), init_from="sft")


def _train_steps(eng, offload_between: bool, steps: int = 3) -> None:
    for i in range(steps):
        batch = _batch(seed=10 + i)
        if offload_between:
            eng.offload()
            lp = eng.forward_backward(batch, None, forward_only=True)["outputs"]["log_probs"]   # still works
            assert torch.isfinite(lp).all()
            eng.onload()
        eng.zero_grad()
        with eng.train_mode():
            eng.forward_backward(batch, lambda o, mb: (_loss(o["log_probs"], o["entropy"], mb), {}))
        assert eng.step()["stepped"]


def test_offload_frees_gradient_buffers_and_training_continues_exactly(role):
    """Colocation: offload() between steps (as while vLLM generates) changes nothing in training."""
    hf = tiny_hf_model("qwen2_tied")
    plain, offloaded = _policy(role, hf), _policy(role, hf)
    _train_steps(plain, offload_between=False)
    _train_steps(offloaded, offload_between=True)
    for (name, a), (_, b) in zip(plain.core.raw_model.named_parameters(), offloaded.core.raw_model.named_parameters()):
        assert torch.equal(a, b), name
    buffers = offloaded.core.model.buffers
    sizes = [b.grad_data.untyped_storage().size() for b in buffers]
    offloaded.offload()
    offloaded.offload()                                             # idempotent
    assert all(b.grad_data.untyped_storage().size() == 0 for b in buffers) and min(sizes) > 0
    with pytest.raises(RuntimeError, match="onload"):
        offloaded.forward_backward(_batch(), lambda o, mb: (_loss(o["log_probs"], o["entropy"], mb), {}))
    with pytest.raises(RuntimeError, match="onload"):
        offloaded.step()
    with pytest.raises(RuntimeError, match="onload"):
        offloaded.zero_grad()                          # would write through views of a freed buffer
    offloaded.onload()
    assert [b.grad_data.untyped_storage().size() for b in buffers] == sizes
    assert all(float(b.grad_data.abs().sum()) == 0.0 for b in buffers)
    # the memory timeline releases parts one by one: the optimizer alone keeps the gradients
    offloaded.offload(["optimizer"])
    assert all(b.grad_data.untyped_storage().size() > 0 for b in buffers)
    with pytest.raises(RuntimeError, match="optimizer offloaded"):
        offloaded.step()
    offloaded.onload(["optimizer"])
    with pytest.raises(ValueError, match="expected a sequence of"):
        offloaded.offload(["weights"])


def _run_bench(*args: str, timeout: int = 300) -> dict:
    """Run tools/bench_train.py and return its JSON result line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(root / "tools" / "bench_train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def test_bench_train_runs_on_cpu_tiny():
    res = _run_bench("--device", "cpu", "--tiny", "--steps", "1", "--head-tokens", "4096", "--recompute", "full")
    assert res["tokens_per_s"] > 0 and res["computed_tokens_per_dp_rank"] >= res["real_tokens_per_dp_rank"]
    assert res["head_peak_unchunked_mib"] > 0 and res["head_peak_ratio_chunked_over_unchunked"] < 0.5
    assert res["recompute"] == "full" and res["optimizer_step_included"] and res["step_s"] >= res["fwd_bwd_s"]
    # model FLOPs: 6·N per token plus causal attention, N as built (tied embedding counted once)
    assert res["params"] == res["params_built"] == 94784
    assert res["model_tflops_per_gpu"] > 0


def test_bench_train_param_count_matches_published_qwen2_5_sizes():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.param_count(bench.SHAPES["qwen2.5-0.5b"]) == 494_032_768      # Qwen2.5-0.5B
    assert bench.param_count(bench.SHAPES["qwen2.5-1.5b"]) == 1_543_714_304    # Qwen2.5-1.5B
    lengths = torch.tensor([4, 2])
    n, L, h = bench.param_count(bench.TINY), 2, 64
    assert bench.model_flops(bench.TINY, lengths) == 6 * n * 6 + 6 * L * h * (16 + 4)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen2.5-0.5b", "qwen2.5-1.5b"])
def test_qwen2_5_shapes_train_at_16k_tokens_in_bf16_without_te(shape):
    """Issue 4 on one H100: a full 16384-token row trains (forward, backward, optimizer step) in
    bf16 on the local spec with SDPA attention, and the chunked log-prob + entropy head over 16384
    tokens of vocabulary 151936 adds at most 2 GiB. Speed is reported by the benchmark, not tested."""
    res = _run_bench("--device", "cuda", "--shape", shape, "--seq", "16384", "--rows", "1", "--lengths", "full",
                     "--dtype", "bfloat16", "--head-tokens", "16384", "--steps", "1",
                     "--max-tokens-per-micro-batch", "16384", timeout=900)
    assert res["real_tokens_per_dp_rank"] == 16384 and res["params"] == res["params_built"]
    assert res["head_peak_chunked_mib"] <= 2048, res


@pytest.mark.gpu
def test_bench_train_gpu_chunked_head_saves_memory():
    res = _run_bench("--device", "cuda", "--tiny", "--head-tokens", "8192")
    assert res["tokens_per_s"] > 0 and res["peak_mem_step_mib"] > 0
    assert res["head_peak_ratio_chunked_over_unchunked"] < 0.5


def part_bytes(eng) -> dict[str, int]:
    """Bytes of an engine's tensors by memory-timeline part: weights, gradient buffers, optimizer state."""
    core = eng.core
    chained = getattr(core.optimizer, "chained_optimizers", [core.optimizer])
    return {
        "weights": sum(p.numel() * p.element_size() for p in core.raw_model.parameters()),
        "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in core.model.buffers),
        "optimizer": sum(p.numel() * p.element_size() for o in chained for g in o.optimizer.param_groups
                         for p in g["params"])
        + sum(t.numel() * t.element_size() for o in chained for st in o.optimizer.state.values()
              for t in st.values() if torch.is_tensor(t) and t.numel() > 1)}


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen2_untied"])
def test_memory_plan_bytes_match_the_engines_tensors(role, name):
    """The memory timeline's bytes per part (parallel/memory_plan.py: bf16 weights 2 B/param, fp32
    gradient buffer 4 B, fp32 master + Adam moments 12 B) against a real bf16 engine after a step."""
    from vcppo_megatron.config import load_config
    from vcppo_megatron.parallel.memory_plan import GIB, timeline_plan

    hf = tiny_hf_model(name)
    pgs, layout = role
    engines = {"actor": _policy(role, hf, params_dtype=torch.bfloat16),
               "critic": ValueEngine(hf.config, pgs, layout, optim=OptimConfig(lr=1e-3),
                                     params_dtype=torch.bfloat16)}
    batch = _batch()
    for eng in engines.values():
        eng.zero_grad()
        with eng.train_mode():
            eng.forward_backward(batch, lambda o, mb: (sum(v.float().sum() for v in o.values()) * 0.0, {}))
        eng.step()                                    # Adam's moments exist from the first step on
    cfg = load_config(None, ["rollout.kv_cache_bytes=1048576", "rollout.max_prompt_tokens=4",
                             "rollout.max_response_tokens=4", "batch.global_prompts_per_step=1",
                             "batch.samples_per_prompt=1", "batch.global_mini_batch_size=1"])
    plan = timeline_plan(cfg, hf.config.to_dict(), world=1, gpu_bytes=80 * GIB)
    for name_, eng in engines.items():
        measured = part_bytes(eng)
        planned = plan.row("rl", f"{name_}_update").gpu
        for part, got in measured.items():
            want = planned[f"{name_}.{part}"]
            assert abs(got - want) <= 0.01 * want, (name_, part, got, want)
