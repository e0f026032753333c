"""Shared set-up of the `gpu`-marked tests (tools/gpu_checks.sh): a one-rank world on GPU 0 and
engines on it. Import-safe without CUDA (nothing touches the device until a fixture runs)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from dist_utils import _free_port


@contextlib.contextmanager
def cuda_world() -> Iterator[None]:
    """This process as a 1-rank world on GPU 0 with the trainer's backends (nccl for CUDA tensors,
    gloo for host ones: parallel/launch.py), TF32 off inside (fp32 matmuls compared with HF's)."""
    from vcppo_megatron.parallel.launch import GPU_BACKEND

    torch.cuda.set_device(0)
    dist.init_process_group(GPU_BACKEND, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cuda_role():
    """A one-rank world on GPU 0 (`cuda_world`) and its (TP=1, PP=1, DP=1) groups."""
    from vcppo_megatron.parallel.groups import build_role_groups

    with cuda_world():
        yield build_role_groups(1, 1)


def cuda_policy(role, hf, *, chunk: int = 8, attention_backend: str = "sdpa", **kw):
    """A PolicyEngine on the CUDA device with `hf`'s weights, loaded from CUDA tensors; the local
    spec with SDPA attention unless told otherwise (Transformer Engine, where installed, runs fp32
    GEMMs in TF32: test_cuda_te.py compares it with its own tolerance)."""
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import PolicyEngine

    pgs, layout = role
    eng = PolicyEngine(hf.config, pgs, layout, optim=OptimConfig(lr=1e-3), logprob_chunk_size=chunk,
                       attention_backend=attention_backend, **kw)
    eng.load_hf_state({k: v.cuda() for k, v in hf.state_dict().items()})
    return eng


def cuda_tensors_of(engine) -> dict[str, torch.device]:
    """Device of every tensor an engine keeps: parameters, buffers, DDP's parameter / gradient
    buffers and the optimizer's state, by name."""
    core = engine.core
    out = {f"param {n}": t.device for n, t in core.raw_model.named_parameters()}
    out.update({f"buffer {n}": t.device for n, t in core.raw_model.named_buffers()})
    for i, b in enumerate(core.model.buffers):
        out[f"ddp param_data {i}"] = b.param_data.device if b.param_data is not None else None
        out[f"ddp grad_data {i}"] = b.grad_data.device
    chained = getattr(core.optimizer, "chained_optimizers", [core.optimizer])
    for j, opt in enumerate(chained):
        for g, group in enumerate(opt.optimizer.param_groups):
            for k, p in enumerate(group["params"]):
                out[f"optimizer {j} group {g} main param {k}"] = p.device
        for k, state in enumerate(opt.optimizer.state.values()):
            for name, t in state.items():
                if torch.is_tensor(t) and t.numel() > 1:
                    out[f"optimizer {j} state {k} {name}"] = t.device
    return {k: v for k, v in out.items() if v is not None}
