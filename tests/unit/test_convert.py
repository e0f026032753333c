"""HF <-> Megatron dist-checkpoint conversion: bit-identical round trips (single file and sharded) and
clear errors for bad input. Each conversion runs in a subprocess-free single-rank gloo group."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_fixtures import tiny_hf_model

from vcppo_megatron.checkpoint import (CheckpointError, ConversionError, convert_hf_to_megatron,
                                       convert_megatron_to_hf, read_checkpoint_meta, resolve_checkpoint_dir)


def _tensors(path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (single file or sharded)."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(path / f))
    return out


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen2_untied", "llama3"])
def test_round_trip_bit_identical(tmp_path, name):
    hf_dir, mg_dir, back = tmp_path / "hf", tmp_path / "mg", tmp_path / "back"
    model = tiny_hf_model(name)
    model.save_pretrained(hf_dir)
    (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    convert_hf_to_megatron(hf_dir, mg_dir, progress=False)
    convert_megatron_to_hf(mg_dir, back, progress=False)
    a, b = _tensors(hf_dir), _tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for f in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (back / f).read_bytes() == (hf_dir / f).read_bytes(), f


def test_sharded_in_and_out(tmp_path):
    """Sharded HF input (index.json) -> Megatron -> sharded HF output; bf16 kept bit-identical."""
    hf_dir = tmp_path / "hf"
    tiny_hf_model("qwen2_untied").to(torch.bfloat16).save_pretrained(hf_dir, max_shard_size="20KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    convert_hf_to_megatron(hf_dir, tmp_path / "mg", progress=False)
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "back", max_shard_bytes=40_000, progress=False)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = _tensors(hf_dir), _tensors(tmp_path / "back")
    assert sorted(a) == sorted(b) and all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    for f in set(index["weight_map"].values()):                 # headers readable by safetensors itself
        with safe_open(tmp_path / "back" / f, "pt") as h:
            assert set(h.keys()) == {k for k, v in index["weight_map"].items() if v == f}


def test_errors(tmp_path):
    hf_dir = tmp_path / "hf"
    tiny_hf_model("qwen2_untied").save_pretrained(hf_dir)
    weights = load_file(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())

    def variant(label, config_edit=None, weights_edit=None, drop_config=False):
        d = tmp_path / label
        shutil.copytree(hf_dir, d)
        if drop_config:
            (d / "config.json").unlink()
        if config_edit:
            (d / "config.json").write_text(json.dumps({**config, **config_edit}))
        if weights_edit:
            save_file(weights_edit(dict(weights)), d / "model.safetensors")
        return d

    cases = [
        (variant("noconfig", drop_config=True), ["config.json is missing"]),
        (variant("arch", {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}),
         ["model_type='mistral'", "qwen2 (Qwen2ForCausalLM)"]),
        (variant("shape", weights_edit=lambda w: {**w, "model.layers.1.mlp.up_proj.weight": torch.zeros(95, 64)}),
         ["'model.layers.1.mlp.up_proj.weight'", "[95, 64]", "expected [96, 64]"]),
        (variant("missing", weights_edit=lambda w: {k: v for k, v in w.items() if k != "model.norm.weight"}),
         ["'model.norm.weight' is missing"]),
    ]
    for d, words in cases:
        with pytest.raises(ConversionError) as err:
            convert_hf_to_megatron(d, tmp_path / "out", progress=False)
        for w in words:
            assert w in str(err.value), (w, str(err.value))
    assert not (tmp_path / "out" / "latest").exists()          # nothing half-written is published
    with pytest.raises(Exception, match="does not exist"):
        convert_megatron_to_hf(tmp_path / "nowhere", tmp_path / "back", progress=False)


def test_checkpoint_dir_errors(tmp_path):
    """Missing, corrupt and dangling checkpoints: CheckpointError naming the path and the problem."""
    tiny_hf_model("llama3").save_pretrained(tmp_path / "hf")
    step = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mg", progress=False)
    assert resolve_checkpoint_dir(tmp_path / "mg") == step
    assert read_checkpoint_meta(step)["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint_dir(tmp_path / "hf")
    (tmp_path / "mg" / "latest").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match="names 'step_00000099'.*does not exist"):
        resolve_checkpoint_dir(tmp_path / "mg")
    (step / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"'\.metadata' is missing"):
        read_checkpoint_meta(step)
    (step / "vcppo_checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="vcppo_checkpoint.json is corrupt"):
        read_checkpoint_meta(step)
