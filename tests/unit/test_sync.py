"""Bucketed HF export of a Megatron actor (TP=1, one process): buckets respect their size, names /
shapes / values equal HF's state dict bit for bit, vocabulary padding is cut, at most one bucket
is alive at a time (counted with weakrefs), and an exported directory reloads in HF
bit-identically and starts vLLM, which a later bucketed sync updates."""
from __future__ import annotations

import json
import weakref

import pytest
import torch

from dist_utils import one_gloo_rank
from model_fixtures import tiny_batch, tiny_hf_model
from vcppo_megatron.checkpoint import hf_to_megatron, load_into_model
from vcppo_megatron.models import build_gpt_model
from vcppo_megatron.rollout.sync import (SyncStats, export_hf_dir, hf_weight_buckets,
                                         iter_bucket_tensors)

MODELS = ("qwen2_tied", "qwen2_untied", "llama3")
BUCKET = 40_000   # bytes: several buckets (tiny models' largest tensor: 128 x 64 x 4 = 32 KiB)


@pytest.fixture(scope="module")
def megatron_tp1():
    """One gloo rank with Megatron parallel state TP=1, PP=1; torn down after the module."""
    with one_gloo_rank(megatron_state=True, drop_vllm_groups=True):
        yield


def megatron_from_hf(hf, pad_vocab: int = 0):
    """Megatron GPTModel holding `hf`'s weights; `pad_vocab` extra random vocabulary rows."""
    c = hf.config
    config = c.to_dict() | {"vocab_size": c.vocab_size + pad_vocab}
    model = build_gpt_model(config, attention_backend="sdpa").eval()
    mg = hf_to_megatron(hf.state_dict(), num_heads=c.num_attention_heads,
                        num_query_groups=c.num_key_value_heads,
                        tie_word_embeddings=c.tie_word_embeddings)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in mg:
            mg[name] = torch.cat([mg[name], torch.randn(pad_vocab, c.hidden_size)])
    load_into_model(model, mg)
    return model


def layer_of(name: str) -> int:
    """Position of an HF name in layer order: embedding -1, layer i, then final norm / lm_head."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return -1 if "embed_tokens" in name else 10**6


def hf_reference(hf) -> dict[str, torch.Tensor]:
    """HF state dict as stored on disk (a tied lm_head is not stored)."""
    state = dict(hf.state_dict())
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


@pytest.mark.parametrize("name", MODELS)
def test_buckets_equal_hf_state_dict(megatron_tp1, name):
    hf = tiny_hf_model(name)
    model = megatron_from_hf(hf, pad_vocab=3 if name == "qwen2_untied" else 0)
    stats = SyncStats()
    buckets = [list(b) for b in hf_weight_buckets(model, hf.config, bucket_bytes=BUCKET,
                                                  stats=stats)]
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    assert len(buckets) >= 3
    for bucket, size in zip(buckets, sizes):
        assert size <= BUCKET or len(bucket) == 1, (size, [n for n, _ in bucket])
    for size, nxt in zip(sizes, buckets[1:]):    # closed only when the next tensor would not fit
        assert size + nxt[0][1].numel() * nxt[0][1].element_size() > BUCKET
    got = [(n, t) for b in buckets for n, t in b]
    ref = hf_reference(hf)
    names = [n for n, _ in got]
    assert sorted(names) == sorted(ref) and len(set(names)) == len(names)
    assert [layer_of(n) for n in names] == sorted(layer_of(n) for n in names)   # layer order
    for n, t in got:
        assert t.shape == ref[n].shape and t.dtype == ref[n].dtype, n
        assert torch.equal(t, ref[n]), n                       # vocab padding cut, exact re-slice
    assert (stats.num_buckets, stats.num_tensors) == (len(buckets), len(got))
    assert stats.total_bytes == sum(sizes) and stats.max_bucket_bytes == max(sizes)


def test_dtype_cast(megatron_tp1):
    hf = tiny_hf_model("qwen2_untied")
    got = dict(iter_bucket_tensors(hf_weight_buckets(
        megatron_from_hf(hf), hf.config, bucket_bytes=BUCKET, dtype=torch.bfloat16)))
    ref = hf_reference(hf)
    assert got.keys() == ref.keys()
    for n, t in got.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[n].bfloat16()), n


def test_at_most_one_bucket_alive(megatron_tp1):
    """Bytes of yielded tensors still referenced anywhere, counted with weakref finalizers from the
    moment their bucket is handed out."""
    hf = tiny_hf_model("qwen2_untied")
    model = megatron_from_hf(hf)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    total = sum(t.numel() * t.element_size() for t in hf_reference(hf).values())
    live = {"now": 0, "peak": 0}

    def release(nbytes: int) -> None:
        live["now"] -= nbytes

    def counted(buckets):
        for bucket in buckets:
            for _, tensor in bucket:
                nbytes = tensor.numel() * tensor.element_size()
                weakref.finalize(tensor, release, nbytes)
                live["now"] += nbytes
            live["peak"] = max(live["peak"], live["now"])
            yield bucket

    def consume(keep: bool) -> tuple[int, SyncStats]:
        live.update(now=0, peak=0)
        kept, stats = [], SyncStats()
        buckets = hf_weight_buckets(model, hf.config, bucket_bytes=BUCKET, stats=stats)
        for _, tensor in iter_bucket_tensors(counted(buckets)):  # copies and drops, like vLLM
            if keep:
                kept.append(tensor)
            del tensor
        return live["peak"], stats

    peak, stats = consume(keep=False)
    print(f"live peak {peak} B, bucket {BUCKET} B, largest param {largest} B, model {total} B")
    assert peak == stats.max_bucket_bytes <= max(BUCKET, largest)
    assert stats.num_buckets >= 5 and stats.total_bytes == total
    assert consume(keep=True)[0] == total > 5 * max(BUCKET, largest)   # the counter sees retention


def test_export_reloads_bit_identical(megatron_tp1, tmp_path):
    from transformers import AutoModelForCausalLM

    for name in ("qwen2_tied", "llama3"):
        hf = tiny_hf_model(name)
        out = tmp_path / name
        (tmp_path / "tok").mkdir(exist_ok=True)
        (tmp_path / "tok" / "tokenizer.json").write_text("{}")
        (tmp_path / "tok" / "model.safetensors").write_text("not copied")
        buckets = hf_weight_buckets(megatron_from_hf(hf), hf.config, bucket_bytes=BUCKET)
        files = export_hf_dir(buckets, out, hf.config, copy_files_from=tmp_path / "tok")
        assert len(files) >= 3
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == sorted(files)
        assert (out / "tokenizer.json").read_text() == "{}"
        assert not list(out.glob("*.tmp"))
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ref = hf.state_dict()
        assert loaded.state_dict().keys() == ref.keys()
        for n, t in loaded.state_dict().items():
            assert torch.equal(t, ref[n]), (name, n)
        ids, _ = tiny_batch()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_errors(megatron_tp1):
    hf = tiny_hf_model("qwen2_untied")
    model = megatron_from_hf(hf)
    with pytest.raises(ValueError, match="bucket_bytes = 0"):
        next(hf_weight_buckets(model, hf.config, bucket_bytes=0))
    bigger = hf.config.to_dict() | {"vocab_size": hf.config.vocab_size + 1}
    with pytest.raises(ValueError, match="vocab_size = 129"):
        next(hf_weight_buckets(model, bigger, bucket_bytes=BUCKET))


def test_export_starts_vllm_and_sync_updates_it(megatron_tp1, tmp_path):
    """vLLM starts from an exported directory, then a bucketed sync from another actor replaces its
    weights: greedy tokens equal HF's for each set. Sleep / wake are no-ops on CPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vcppo_megatron.config.schema import RolloutConfig
    from vcppo_megatron.data.synthetic import build_tokenizer
    from vcppo_megatron.rollout import RolloutEngine
    from vcppo_megatron.rollout.sync import sync_to_rollout

    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, initializer_range=0.2, torch_dtype="float32",
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         architectures=["Qwen2ForCausalLM"])
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(Qwen2ForCausalLM(config).eval())
    tok.save_pretrained(tmp_path / "tok")
    export_hf_dir(hf_weight_buckets(megatron_from_hf(models[0]), config, bucket_bytes=BUCKET),
                  tmp_path / "model", config, copy_files_from=tmp_path / "tok")
    engine = RolloutEngine(tmp_path / "model", RolloutConfig(
        max_prompt_tokens=8, max_response_tokens=10, dtype="float32", kv_cache_bytes=8 << 20),
        seed=0, pad_token_id=tok.pad_token_id)
    prompts = [tok(t)["input_ids"] for t in ("1+2=", "34+5=", "70-7=")]

    def assert_greedy_equals(hf) -> list[list[int]]:
        got = engine.generate(prompts, n=1, greedy=True).response_token_ids
        for prompt, response in zip(prompts, got):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                  do_sample=False, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
            assert response == ref
        return got

    before = assert_greedy_equals(models[0])
    assert engine.sleep() is False and engine.wake_up() is False          # CPU: nothing to free
    stats = SyncStats()
    sync_to_rollout(engine, hf_weight_buckets(megatron_from_hf(models[1]), config,
                                              bucket_bytes=BUCKET, stats=stats))
    assert stats.num_buckets >= 5
    assert assert_greedy_equals(models[1]) != before
