"""Run a function on N gloo ranks in spawned processes (the distributed tests' launcher)."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Any, Callable, Iterator

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    # the variables torchrun sets (vLLM's external launcher reads RANK / LOCAL_RANK, one host)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> None:
    """Call `fn(rank, world_size, *args)` on `world_size` gloo ranks; re-raise any rank's error.

    `fn` must be a module-level function (it is pickled by reference into spawned processes).
    """
    for attempt in range(3):
        try:
            mp.spawn(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
            return
        except mp.ProcessRaisedException as e:
            # the free port was taken by another process before rank 0 bound it: pick another
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise


@contextlib.contextmanager
def one_gloo_rank(megatron_state: bool = False, drop_vllm_groups: bool = False) -> Iterator[None]:
    """This process as a 1-rank gloo world (unless one exists), torn down on exit.

    `megatron_state`: also Megatron's parallel_state at TP = PP = 1 with its RNG tracker seeded
    (for code that still reads it). `drop_vllm_groups`: an in-process vLLM engine built its groups
    on this world; drop them with it, so that a later engine starts clean.
    """
    from vcppo_megatron.platform import setup_device

    setup_device()
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if megatron_state:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        if megatron_state:
            parallel_state.destroy_model_parallel()
        if drop_vllm_groups and "vllm" in sys.modules:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        if own and dist.is_initialized():
            dist.destroy_process_group()
