"""The device of a pipeline stage after the first (issue 14 item 6).

On a GPU megatron builds its layers on the current device, but a torch module built beside them
(the local spec's RMSNorm, the critic's value head) lands wherever it is built. The engine used
to take its device from the first parameter, which on a stage without the embedding is a norm:
micro-batches then stayed on the host. Here the engine's device is patched to `meta` (standing in
for the GPU) and DDP / the optimizer are stubbed: every parameter of a last-stage critic (layers,
final norm, value head; no embedding) must end up on the chosen device, and so must the device the
engine sends micro-batches to.
"""
from __future__ import annotations

import types

import pytest
import torch

from dist_utils import one_gloo_rank
from model_fixtures import tiny_hf_model
from vcppo_megatron.config.schema import OptimConfig


def test_later_pipeline_stage_keeps_every_parameter_on_the_engine_device(monkeypatch):
    from vcppo_megatron.engines import core as core_mod
    from vcppo_megatron.parallel.groups import RoleLayout, build_role_groups

    wrapped: list[torch.nn.Module] = []

    def fake_ddp(config, ddp_config, module, pg_collection=None):
        wrapped.append(module)
        return types.SimpleNamespace(no_sync=None, module=module)

    monkeypatch.setattr(core_mod, "engine_device", lambda: torch.device("meta"), raising=False)
    monkeypatch.setattr(core_mod, "DistributedDataParallel", fake_ddp)
    monkeypatch.setattr(core_mod, "get_megatron_optimizer", lambda *a, **k: None)
    monkeypatch.setattr(core_mod, "OptimizerParamScheduler", lambda *a, **k: None)
    monkeypatch.setattr(core_mod, "P2PCommunicator", lambda *a, **k: None)
    with one_gloo_rank():
        pgs, _ = build_role_groups(1, 1)
        stage = RoleLayout(tp=1, pp=2, dp=1, tp_rank=0, pp_rank=1, dp_rank=0)    # the last of 2 stages
        core = core_mod.EngineCore(tiny_hf_model("qwen2_untied").config.to_dict(), pgs, stage,
                                   value_head=True, optim=OptimConfig(), attention_backend="sdpa")
    names = {n: p.device for n, p in wrapped[0].named_parameters()}
    assert not any(n.startswith("embedding.") for n in names), "a stage after the first has no embedding"
    assert {"decoder.final_layernorm.weight", "output_layer.weight"} <= set(names)
    assert core.device == torch.device("meta")
    assert set(names.values()) == {torch.device("meta")}, {n: d for n, d in names.items() if d.type != "meta"}


def test_engine_device_follows_local_rank(monkeypatch):
    from vcppo_megatron.engines.core import engine_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert engine_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)       # e.g. moved by vLLM's default executor
    with pytest.raises(RuntimeError, match="current CUDA device is 0, expected LOCAL_RANK 3"):
        engine_device()
