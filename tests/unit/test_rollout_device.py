"""Rollout TP = 1 on a multi-GPU node: each rank's vLLM engine must run on the rank's own GPU.

Simulated node of 2 GPUs, rank 1 (LOCAL_RANK 1), torch.cuda and torch.distributed monkeypatched:
the trainer's `init_distributed` selects cuda:1; vllm.LLM is replaced by a recorder that resolves
the executor vLLM would build from the engine's arguments and asks that executor class (vLLM's own
`_distributed_args`) which local rank it gives the worker. vLLM's GPU worker then runs on
cuda:<local rank> and calls set_device on it (vllm/v1/worker/gpu_worker.py), so the local rank
must be 1 too. vLLM's default single-process executor answers 0 (the device string is plain
"cuda"): every engine on GPU 0, and the Megatron side's current device moved with it.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from vcppo_megatron.config.schema import RolloutConfig
from vcppo_megatron.data.synthetic import build_tokenizer
from test_rollout import build_model_dir


def _vllm_local_rank(kwargs: dict) -> tuple[str, int]:
    """(executor class, local rank) vLLM picks for these LLM(...) arguments on a CUDA device."""
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher, UniProcExecutor

    backend = kwargs.get("distributed_executor_backend")
    # vllm/v1/executor/abstract.py get_class: tensor_parallel_size 1 and no backend -> "uni"
    assert backend in (None, "external_launcher") and (backend or kwargs["tensor_parallel_size"] == 1)
    cls = ExecutorWithExternalLauncher if backend == "external_launcher" else UniProcExecutor
    # vllm/config/device.py: device "auto" on CUDA becomes torch.device("cuda"), no index
    fake = types.SimpleNamespace(vllm_config=types.SimpleNamespace(
        device_config=types.SimpleNamespace(device=torch.device("cuda"))))
    _, _, local_rank = cls._distributed_args(fake)
    return cls.__name__, local_rank


@pytest.mark.parametrize("tp", [1, 2])
def test_rollout_engine_uses_the_ranks_own_gpu(tmp_path, monkeypatch, tp):
    from vcppo_megatron.parallel import launch as launch_mod
    from vcppo_megatron.rollout import engine as engine_mod

    build_model_dir(tmp_path)
    set_device: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_device.append(int(d)))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for k, v in dict(SLURM_JOB_ID="9", SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1", SLURM_NODEID="0",
                     SLURM_JOB_NODELIST="gpu01", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2").items():
        monkeypatch.setenv(k, v)
    launch = launch_mod.init_distributed()                 # srun task 1 of a 2-GPU node
    assert launch.local_rank == 1 and set_device == [1]

    recorded: dict = {}

    class RecordingLLM:
        def __init__(self, **kwargs):
            recorded.update(kwargs)

    monkeypatch.setattr(engine_mod, "_import_vllm", lambda: types.SimpleNamespace(LLM=RecordingLLM))
    config = RolloutConfig(max_prompt_tokens=8, max_response_tokens=8, kv_cache_bytes=1 << 20,
                           tensor_parallel_size=tp)
    engine_mod.RolloutEngine(tmp_path, config, seed=0, pad_token_id=build_tokenizer().pad_token_id)
    executor, local_rank = _vllm_local_rank(recorded)
    assert (executor, local_rank) == ("ExecutorWithExternalLauncher", 1), recorded
    # the GPU worker sets cuda:<local_rank>: the device the trainer selected, not GPU 0
    assert set_device + [local_rank] == [1, 1]


def test_external_launcher_without_its_variables_fails_clearly(monkeypatch):
    from vcppo_megatron.rollout.engine import use_external_launcher

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"rollout.tensor_parallel_size = 1 on 2 ranks.*'RANK', 'LOCAL_RANK'"):
        use_external_launcher(1)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert use_external_launcher(1) is False              # one process, no launcher: vLLM's default
