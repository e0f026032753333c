"""HF -> Megatron conversion and GPTModel forward on CPU (TP=1): logits equal HF's; exact round trip;
SDPA core attention equals Megatron's unfused attention; clear errors for unsupported configs."""
from __future__ import annotations


import pytest
import torch

from dist_utils import one_gloo_rank
from model_fixtures import tiny_batch, tiny_hf_model
from vcppo_megatron.checkpoint import (hf_to_megatron, load_into_model, megatron_to_hf, tp_merge,
                                       tp_shard)
from vcppo_megatron.models import SUPPORTED_ARCHITECTURES, architecture_from_hf, build_gpt_model
from vcppo_megatron.platform import setup_device

LOGIT_TOL, ATTN_TOL = 1e-4, 1e-5
MODELS = ("qwen2_tied", "qwen2_untied", "llama3")


@pytest.fixture(scope="module")
def megatron_tp1():
    """One gloo rank with Megatron parallel state TP=1, PP=1 (CPU compat layer on)."""
    assert setup_device() == torch.device("cpu")
    assert not torch.cuda.is_available()
    with one_gloo_rank(megatron_state=True):
        yield


def _megatron_from_hf(hf, **kw):
    """Build a Megatron GPTModel for `hf`'s config and load its converted weights."""
    model = build_gpt_model(hf.config, params_dtype=torch.float32, **kw).eval()
    mg = hf_to_megatron(hf.state_dict(), num_heads=hf.config.num_attention_heads,
                        num_query_groups=hf.config.num_key_value_heads,
                        tie_word_embeddings=hf.config.tie_word_embeddings)
    if kw.get("value_head"):
        mg = {k: v for k, v in mg.items() if not k.startswith("output_layer.")}
        mg.update(model.output_layer.state_dict(prefix="output_layer."))
    load_into_model(model, mg)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_megatron_logits_match_hf(megatron_tp1, name):
    hf = tiny_hf_model(name)
    ids, pos = tiny_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        diffs = {}
        for backend in ("sdpa", "unfused"):
            model = _megatron_from_hf(hf, attention_backend=backend)
            # RoPE frequencies (incl. llama3 scaling, too small to show in short-sequence logits)
            torch.testing.assert_close(model.rotary_pos_emb.inv_freq, hf.model.rotary_emb.inv_freq,
                                       rtol=1e-6, atol=0)
            got = model(ids, pos, None)
            assert got.shape == ref.shape
            diffs[backend] = float((got - ref).abs().max())
    print(f"{name}: max |logits - HF| = {diffs}")
    assert max(diffs.values()) <= LOGIT_TOL, diffs


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_is_bit_identical(megatron_tp1, name):
    hf = tiny_hf_model(name)
    kw = dict(num_heads=hf.config.num_attention_heads, num_query_groups=hf.config.num_key_value_heads,
              tie_word_embeddings=hf.config.tie_word_embeddings)
    ref = hf.state_dict()
    mg = hf_to_megatron(ref, **kw)
    assert ("output_layer.weight" in mg) == (not hf.config.tie_word_embeddings)
    model = _megatron_from_hf(hf, attention_backend="sdpa")  # through a real model's state dict
    for back in (megatron_to_hf(mg, **kw), megatron_to_hf(model.state_dict(), **kw)):
        assert set(back) == set(ref)
        for key, tensor in ref.items():
            assert torch.equal(back[key], tensor), key
    for tp in (2, 4 if hf.config.num_key_value_heads % 4 == 0 else 2):
        for key, tensor in mg.items():
            shards = [tp_shard(key, tensor, tp_rank=r, tp_size=tp, num_query_groups=kw["num_query_groups"])
                      for r in range(tp)]
            assert torch.equal(tp_merge(key, shards, num_query_groups=kw["num_query_groups"]), tensor), key


def test_qkv_shard_holds_whole_query_groups():
    heads, groups, hd, hidden = 4, 2, 3, 5
    q, k, v = (torch.randn(n * hd, hidden) for n in (heads, groups, groups))
    from vcppo_megatron.checkpoint import interleave_qkv

    qkv = interleave_qkv(q, k, v, groups)
    shard1 = tp_shard("decoder.layers.0.self_attention.linear_qkv.weight", qkv, tp_rank=1, tp_size=2,
                      num_query_groups=groups)
    expect = torch.cat([q[2 * hd:4 * hd], k[hd:2 * hd], v[hd:2 * hd]])  # group 1: q heads 2-3, k1, v1
    assert torch.equal(shard1, expect)
    fc1 = torch.arange(8.0)[:, None]                        # [gate 0..3; up 4..7]
    got = tp_shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, tp_rank=0, tp_size=2, num_query_groups=1)
    assert got.flatten().tolist() == [0.0, 1.0, 4.0, 5.0]


def test_sdpa_core_attention_matches_unfused(megatron_tp1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from vcppo_megatron.models import SDPAttention

    cfg = architecture_from_hf(tiny_hf_model("qwen2_untied").config, attention_backend="sdpa").config
    kw = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    sdpa, unfused = SDPAttention(**kw).eval(), DotProductAttention(**kw).eval()
    s, b, hd = 9, 3, cfg.kv_channels
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, cfg.num_attention_heads, hd, generator=g)
    k, v = (torch.randn(s, b, cfg.num_query_groups, hd, generator=g) for _ in range(2))
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    pad = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    pad[1, ..., :3] = True                                  # left padding in one row
    diffs = []
    for mask in (None, (causal | pad).expand(b, 1, s, s)):
        with torch.no_grad():
            a, r = sdpa(q, k, v, mask), unfused(q.clone(), k.clone(), v.clone(), mask)
        assert a.shape == r.shape == (s, b, cfg.num_attention_heads * hd)
        if mask is None:
            diffs.append(float((a - r).abs().max()))
        else:                                               # fully masked query rows: SDPA gives 0
            dead = mask.all(dim=-1)[:, 0].T                 # [s, b]
            assert dead.sum() == 3 and torch.equal(a[dead], torch.zeros_like(a[dead]))
            diffs.append(float((a[~dead] - r[~dead]).abs().max()))
    print(f"max |SDPA - unfused| = {diffs}")
    assert max(diffs) <= ATTN_TOL, diffs


def test_value_head_reads_final_hidden_state(megatron_tp1):
    hf = tiny_hf_model("qwen2_tied")
    model = _megatron_from_hf(hf, attention_backend="sdpa", value_head=True)
    ids, pos = tiny_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, pos, None), torch.zeros(*ids.shape, 1))  # zero-initialised
        model.output_layer.weight.normal_()
        model.output_layer.bias.fill_(0.5)
        values = model(ids, pos, None)
        ref = model.output_layer(hf.model(input_ids=ids).last_hidden_state)[0]
    assert "embedding.word_embeddings.weight" in model.state_dict()
    assert values.shape == (*ids.shape, 1)
    assert float((values - ref).abs().max()) <= LOGIT_TOL


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ValueError) as err:
        architecture_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    for arch in SUPPORTED_ARCHITECTURES.values():
        assert arch in str(err.value)
    assert "gpt2" in str(err.value)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        architecture_from_hf({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})


def test_vocab_not_divisible_by_tp_raises():
    cfg = dict(tiny_hf_model("qwen2_tied").config.to_dict(), vocab_size=19)
    architecture_from_hf(cfg)
    with pytest.raises(ValueError, match="vocab_size=19 is not divisible by tensor_model_parallel_size=2"):
        architecture_from_hf(cfg, tensor_model_parallel_size=2)


def test_local_spec_norms_support_sequence_parallelism():
    """The local specs use this package's RMSNorm (also as the final norm): equal to torch's, and
    under sequence parallelism its weight is marked for the TP all-reduce of its gradient."""
    from vcppo_megatron.models.norm import RMSNorm

    for backend in ("sdpa", "unfused"):
        arch = architecture_from_hf(tiny_hf_model("qwen2_tied").config, attention_backend=backend)
        assert arch.layer_spec.submodules.input_layernorm is RMSNorm
        assert arch.layer_spec.submodules.pre_mlp_layernorm is RMSNorm and arch.layer_norm is RMSNorm
    cfg = architecture_from_hf(tiny_hf_model("qwen2_tied").config, attention_backend="sdpa").config
    norm = RMSNorm(cfg, 8, eps=1e-6)
    ref = torch.nn.RMSNorm(8, eps=1e-6)
    x = torch.randn(3, 8)
    assert torch.equal(norm(x), ref(x)) and norm.weight.sequence_parallel is False
    cfg.sequence_parallel = True
    assert RMSNorm(cfg, 8).weight.sequence_parallel is True


def test_unsupported_rope_scaling_raises():
    cfg = tiny_hf_model("llama3").config.to_dict()
    cfg["rope_parameters"] = dict(cfg["rope_parameters"], high_freq_factor=2.0)
    with pytest.raises(ValueError, match="high_freq_factor"):
        architecture_from_hf(cfg)
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="yarn"):
        architecture_from_hf(cfg)
    arch = architecture_from_hf(tiny_hf_model("llama3").config)
    assert arch.rope_scaling and arch.rope_scaling_factor == 8.0 and arch.rotary_base == 500000.0
    assert not arch.config.add_qkv_bias and arch.config.num_query_groups == 2


def test_cpu_compat_layer(megatron_tp1):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    assert setup_device() == torch.device("cpu") and not torch.cuda.is_available()   # idempotent
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu" and torch.ones(1).to("cuda:0").device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"                # optimizer dtype checks
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64        # conversion untouched
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
    end.record()
    torch.cuda.synchronize()
    assert start.elapsed_time(end) >= 0.0
    model_parallel_cuda_manual_seed(1234)
    default_state = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(4)                                   # the forked stream advanced
    assert not torch.equal(a, b) and torch.equal(torch.get_rng_state(), default_state)
    model_parallel_cuda_manual_seed(1234)                   # reseeding replays the forked stream
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)
