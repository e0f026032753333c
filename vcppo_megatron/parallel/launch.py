"""Launcher environment: read torchrun or SLURM variables, then initialise torch.distributed.

The same SPMD program runs on every GPU. Under `srun` (one task per GPU) SLURM sets SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID and the node list; under `torchrun` the variables RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and MASTER_PORT are set.
`init_distributed` exports the torchrun variables under srun too (vLLM's external launcher reads
them). No Ray.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, MutableMapping

import torch
import torch.distributed as dist


class LaunchError(RuntimeError):
    """The launcher environment is missing or inconsistent; the message names the variables."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    launcher: str
    """'torchrun', 'slurm' or 'single' (no launcher: one process)."""

    def describe(self) -> str:
        """One line for the start-of-run log."""
        return (f"launcher={self.launcher} rank={self.rank}/{self.world_size} "
                f"local_rank={self.local_rank}/{self.local_world_size} "
                f"node={self.node_rank}/{self.num_nodes} master={self.master_addr}:{self.master_port}")


_DEFAULT_PORT = 29500


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list such as `gpu[01-03,07],login1` into host names, in order."""
    depth = 0
    for char in nodelist:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            break
    if depth != 0:
        raise LaunchError(f"SLURM node list {nodelist!r}: unbalanced brackets")
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        item = item.strip().lstrip(",")
        if item:
            hosts.extend(_expand_one(item, nodelist))
    if not hosts:
        raise LaunchError(f"SLURM node list {nodelist!r}: no host names found")
    return hosts


def _expand_one(item: str, whole: str) -> list[str]:
    """Expand one host pattern with zero or more bracket ranges (`a[1-2]b[3,5]`)."""
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        if "[" in item or "]" in item:
            raise LaunchError(f"SLURM node list {whole!r}: unbalanced brackets in {item!r}")
        return [item]
    prefix, rest = item[:match.start()], item[match.end():]
    out = []
    for part in match.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            numbers = [str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise LaunchError(f"SLURM node list {whole!r}: bad range {part!r} in {item!r}, "
                              f"expected N or N-M with N <= M")
        for number in numbers:
            out.extend(_expand_one(prefix + number + rest, whole))
    return out


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    """Read an integer variable, naming it when it is missing or malformed."""
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise LaunchError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw.split("(")[0])  # SLURM_TASKS_PER_NODE looks like '4(x2)'
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r}: expected an integer") from None


def _port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else a port derived from SLURM_JOB_ID (all tasks agree), else 29500."""
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    elif env.get("SLURM_JOB_ID"):
        port = 20000 + _int(env, "SLURM_JOB_ID") % 20000
    else:
        port = _DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise LaunchError(f"MASTER_PORT={port}: expected a TCP port in [1, 65535]")
    return port


def _slurm(env: Mapping[str, str]) -> LaunchEnv:
    """Read the variables srun sets for each task."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_STEP_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_PROCID is set but neither SLURM_JOB_NODELIST nor SLURM_NODELIST is")
    hosts = expand_nodelist(nodelist)
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    num_nodes = _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", len(hosts)))
    local_rank, node_rank = _int(env, "SLURM_LOCALID"), _int(env, "SLURM_NODEID")
    local_world = _int(env, "SLURM_NTASKS_PER_NODE", _int(env, "SLURM_TASKS_PER_NODE", world // num_nodes))
    out = LaunchEnv(rank, world, local_rank, local_world, node_rank, num_nodes,
                    env.get("MASTER_ADDR") or hosts[0], _port(env), "slurm")
    if len(hosts) != num_nodes:
        raise LaunchError(f"SLURM node list {nodelist!r} has {len(hosts)} hosts but "
                          f"SLURM_JOB_NUM_NODES={num_nodes}")
    if local_world * num_nodes != world:
        raise LaunchError(f"SLURM_NTASKS={world} != tasks per node {local_world} x nodes {num_nodes}: "
                          f"use the same number of tasks on every node (--ntasks-per-node)")
    return _check(out)


def _torchrun(env: Mapping[str, str]) -> LaunchEnv:
    """Read the variables torchrun sets for each worker."""
    world = _int(env, "WORLD_SIZE")
    local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    if world % local_world:
        raise LaunchError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}")
    out = LaunchEnv(_int(env, "RANK"), world, _int(env, "LOCAL_RANK", 0), local_world,
                    _int(env, "GROUP_RANK", _int(env, "NODE_RANK", 0)), world // local_world,
                    env.get("MASTER_ADDR") or "127.0.0.1", _port(env), "torchrun")
    return _check(out)


def _check(e: LaunchEnv) -> LaunchEnv:
    """Raise LaunchError if ranks fall outside their sizes."""
    for name, value, size, size_name in (("rank", e.rank, e.world_size, "world size"),
                                         ("local rank", e.local_rank, e.local_world_size, "local world size"),
                                         ("node rank", e.node_rank, e.num_nodes, "number of nodes")):
        if not 0 <= value < size:
            raise LaunchError(f"{e.launcher}: {name}={value} is outside [0, {size}) ({size_name}={size})")
    if e.rank // e.local_world_size != e.node_rank:
        raise LaunchError(f"{e.launcher}: rank={e.rank} with {e.local_world_size} tasks per node should be "
                          f"on node {e.rank // e.local_world_size}, but node rank={e.node_rank} "
                          f"(ranks must be assigned block-wise: srun --distribution=block)")
    if e.rank % e.local_world_size != e.local_rank:
        raise LaunchError(f"{e.launcher}: rank={e.rank} should have local rank "
                          f"{e.rank % e.local_world_size}, but local rank={e.local_rank}")
    return e


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the launch environment: torchrun (RANK set) over SLURM (SLURM_PROCID) over single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _torchrun(env)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _slurm(env)
    return LaunchEnv(0, 1, 0, 1, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1", _port(env), "single")


def torchrun_variables(launch: LaunchEnv) -> dict[str, str]:
    """The torchrun-style variables of `launch` (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    GROUP_RANK, MASTER_ADDR, MASTER_PORT): what vLLM's external launcher and torch's env://
    initialisation read."""
    return {"RANK": str(launch.rank), "LOCAL_RANK": str(launch.local_rank), "WORLD_SIZE": str(launch.world_size),
            "LOCAL_WORLD_SIZE": str(launch.local_world_size), "GROUP_RANK": str(launch.node_rank),
            "MASTER_ADDR": launch.master_addr, "MASTER_PORT": str(launch.master_port)}


def export_launch_env(launch: LaunchEnv, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Export the torchrun-style variables into `environ` (os.environ) and return them.

    srun sets only SLURM_* for each task, but vLLM's external launcher (every rollout engine of a
    multi-rank run) reads RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (vllm/v1/executor/
    uniproc_executor.py, ExecutorWithExternalLauncher._distributed_args). A variable already set
    to another value is an error: two launchers disagree about this process.
    """
    environ = os.environ if environ is None else environ
    wanted = torchrun_variables(launch)
    clash = {k: (environ[k], v) for k, v in wanted.items() if environ.get(k) not in (None, "", v)}
    if clash:
        raise LaunchError(f"{launch.launcher}: environment variables disagree with the launch environment, "
                          f"name: (set, expected) = {clash}")
    environ.update(wanted)
    return wanted


GPU_BACKEND = "cpu:gloo,cuda:nccl"


def init_distributed(env: Mapping[str, str] | None = None, backend: str | None = None,
                     timeout_s: float = 1800.0) -> LaunchEnv:
    """Initialise the default process group from the launch env: on GPUs nccl for CUDA tensors
    and gloo for host tensors (the trainer reduces metrics on the host, per-token tensors on the
    device; subgroups inherit both), on CPU gloo. Reading os.environ (`env` None), it also exports
    the torchrun-style variables (`export_launch_env`): under srun only SLURM_* are set."""
    launch = read_launch_env(env)
    if env is None:                       # before vLLM starts: its external launcher reads them
        export_launch_env(launch)
    if backend is None:
        backend = GPU_BACKEND if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        if launch.local_rank >= torch.cuda.device_count():
            raise LaunchError(f"local rank {launch.local_rank} has no GPU: this node shows "
                              f"{torch.cuda.device_count()} (one task per GPU expected)")
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend,
                                init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout_s))
    return launch
