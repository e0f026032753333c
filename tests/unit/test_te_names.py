"""Transformer Engine's Megatron names (issue 14 item 1), on a machine without TE.

With TE (the NGC container) megatron's layer spec fuses each norm into the linear after it
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`) and adds
`_extra_state` entries. `fake_te.py` builds megatron-core's own TE spec with stand-in modules that
register TE's parameter names, so the name map is checked against the module tree megatron builds:
the names and shapes, forward outputs equal to the local spec's for the mapped weights (a swapped
norm would show), and bit-exact round trips HF -> Megatron (TE names) -> HF through the full-state
loader, the per-parameter `load_hf_dir`, the weight-sync buckets, TP split / merge and the
dist-checkpoint converters. Without TE, choosing it fails with a clear error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_utils import one_gloo_rank
from fake_te import use_fake_te
from model_fixtures import tiny_batch, tiny_hf_model

from vcppo_megatron.checkpoint import (hf_to_megatron, layer_spec_of, load_into_model, megatron_to_hf, spec_name,
                                       tp_merge, tp_shard)

TE_NORMS = ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")


@pytest.fixture
def fake_te(monkeypatch):
    use_fake_te(monkeypatch)


def _heads(hf) -> dict:
    c = hf.config
    return dict(num_heads=c.num_attention_heads, num_query_groups=c.num_key_value_heads,
                tie_word_embeddings=c.tie_word_embeddings)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.mark.parametrize("name", ["qwen2_untied", "qwen2_tied", "llama3"])
def test_te_spec_names_round_trip_and_forward(fake_te, name):
    from vcppo_megatron.models import build_gpt_model

    hf = tiny_hf_model(name)
    with one_gloo_rank(megatron_state=True):
        te = build_gpt_model(hf.config, attention_backend="te").eval()
        local = build_gpt_model(hf.config, attention_backend="sdpa").eval()
        te_names, local_names = _weights(te), _weights(local)
        assert layer_spec_of(te_names) == "transformer_engine" and layer_spec_of(local_names) == "local"
        assert {spec_name(k, "transformer_engine"): tuple(v.shape) for k, v in local_names.items()} == \
            {k: tuple(v.shape) for k, v in te_names.items()}
        for suffix in TE_NORMS:
            assert f"decoder.layers.1.{suffix}" in te_names
        extra = {k for k in te.state_dict() if k.endswith("_extra_state")}
        for module in ("linear_qkv", "core_attention", "linear_proj"):
            assert f"decoder.layers.0.self_attention.{module}._extra_state" in extra, module
        # HF -> Megatron (TE names) -> HF, bit-exact; every TE parameter covered
        full = hf_to_megatron(hf.state_dict(), **_heads(hf), layer_spec="transformer_engine")
        load_into_model(te, full)
        back = megatron_to_hf(te.state_dict(), **_heads(hf))
        ref = {k: v for k, v in hf.state_dict().items() if not k.endswith("inv_freq")}
        assert sorted(back) == sorted(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
        # the same weights in the local layout compute the same logits (norms in the right places)
        load_into_model(local, hf_to_megatron(hf.state_dict(), **_heads(hf)))
        ids, pos = tiny_batch()
        with torch.no_grad():
            out_te, out_local = te(ids, pos, None), local(ids, pos, None)
            ref_logits = hf(input_ids=ids).logits
        torch.testing.assert_close(out_te, out_local, rtol=0, atol=1e-6)
        torch.testing.assert_close(out_te, ref_logits, rtol=0, atol=1e-4)


def test_te_names_split_and_merge_over_tp():
    hf = tiny_hf_model("qwen2_untied")
    full = hf_to_megatron(hf.state_dict(), **_heads(hf), layer_spec="transformer_engine")
    for name, tensor in full.items():
        shards = [tp_shard(name, tensor, tp_rank=r, tp_size=2, num_query_groups=2) for r in range(2)]
        assert torch.equal(tp_merge(name, shards, num_query_groups=2), tensor), name
        if name.endswith(TE_NORMS):                                   # norms are replicated
            assert all(torch.equal(s, tensor) for s in shards), name


def test_engine_loads_hf_dir_and_syncs_with_te_names(fake_te, tmp_path):
    """PolicyEngine / ValueEngine on the TE spec: per-parameter load_hf_dir, full-state load, and the
    weight-sync buckets give back the HF tensors bit-exact."""
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import PolicyEngine, ValueEngine
    from vcppo_megatron.parallel.groups import build_role_groups
    from vcppo_megatron.rollout.sync import hf_weight_buckets, iter_bucket_tensors

    hf = tiny_hf_model("qwen2_untied")
    hf.save_pretrained(tmp_path)
    ref = load_file(tmp_path / "model.safetensors")
    with one_gloo_rank():
        pgs, layout = build_role_groups(1, 1)
        policy = PolicyEngine(hf.config, pgs, layout, optim=OptimConfig(), attention_backend="te")
        assert policy.core.layer_spec == "transformer_engine"
        for load in (lambda: policy.load_hf_dir(tmp_path), lambda: policy.load_hf_state(hf.state_dict())):
            with torch.no_grad():
                for p in policy.core.raw_model.parameters():
                    p.zero_()
            load()
            synced = dict(iter_bucket_tensors(hf_weight_buckets([policy.core.model], hf.config,
                                                                bucket_bytes=20_000)))
            assert sorted(synced) == sorted(ref) and all(torch.equal(synced[k], ref[k]) for k in ref)
        critic = ValueEngine(hf.config, pgs, layout, optim=OptimConfig(), attention_backend="te")
        critic.load_hf_dir(tmp_path, init_from="policy")
        got = _weights(critic.core.raw_model)
        for i in range(2):
            assert torch.equal(got[f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"],
                               ref[f"model.layers.{i}.post_attention_layernorm.weight"])
            assert torch.equal(got[f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight"],
                               ref[f"model.layers.{i}.input_layernorm.weight"])


def test_converters_read_and_write_te_names(fake_te, tmp_path):
    """HF -> Megatron checkpoint in TE names -> loaded into the TE model; a checkpoint saved by the
    TE model -> HF: bit-exact both ways."""
    from vcppo_megatron.checkpoint import (convert_hf_to_megatron, convert_megatron_to_hf, load_checkpoint,
                                           read_checkpoint_meta, save_checkpoint)
    from vcppo_megatron.models import build_gpt_model
    from vcppo_megatron.parallel.groups import build_role_groups

    hf = tiny_hf_model("qwen2_tied")
    hf.save_pretrained(tmp_path / "hf")
    ref = load_file(tmp_path / "hf" / "model.safetensors")
    step = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mg", layer_spec="transformer_engine", progress=False)
    assert read_checkpoint_meta(step)["layer_spec"] == "transformer_engine"
    with one_gloo_rank(megatron_state=True):
        pgs, _ = build_role_groups(1, 1)
        te = build_gpt_model(hf.config, attention_backend="te", pg_collection=pgs)
        load_checkpoint(tmp_path / "mg", model=te, pg_collection=pgs, load_rng=False)
        back = megatron_to_hf(te.state_dict(), **_heads(hf))
        assert all(torch.equal(back[k], ref[k]) for k in ref)
        with torch.no_grad():                                         # a trained model: new weights
            for p in te.parameters():
                p.add_(0.01 * torch.randn_like(p))
        trained = megatron_to_hf(te.state_dict(), **_heads(hf))
        save_checkpoint(tmp_path / "trained", 5, model=te, pg_collection=pgs, model_config=hf.config.to_dict())
    convert_megatron_to_hf(tmp_path / "trained", tmp_path / "back", hf_files_dir=tmp_path / "hf", progress=False)
    out = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(out) == sorted(ref) and all(torch.equal(out[k], trained[k]) for k in ref)


def test_transformer_engine_without_te_fails_clearly():
    from vcppo_megatron.models.registry import have_transformer_engine, resolve_attention_backend

    if have_transformer_engine():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ValueError, match=r"layer_spec=transformer_engine .*needs Transformer Engine.*"
                                         r"choose layer_spec: local"):
        resolve_attention_backend("te")
    assert resolve_attention_backend("auto") == "sdpa"          # auto falls back to the local spec


def test_trainer_names_the_field_when_te_is_missing(tmp_path):
    from vcppo_megatron.config import ConfigError, load_config
    from vcppo_megatron.models.registry import have_transformer_engine
    from vcppo_megatron.trainer.loop import Trainer

    if have_transformer_engine():
        pytest.skip("Transformer Engine is installed here")
    recipe = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"
    cfg = load_config(recipe, ["critic.layer_spec=transformer_engine",
                                                 f"trainer.output_dir={tmp_path}"])
    with one_gloo_rank(), pytest.raises(ConfigError, match=r"critic.layer_spec = transformer_engine: .*"
                                                           r"needs Transformer Engine"):
        Trainer(cfg)
