"""Launcher environment: SLURM / torchrun variables -> ranks, master address; a real 2-task run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vcppo_megatron.parallel.launch import LaunchError, expand_nodelist, read_launch_env

ROOT = Path(__file__).resolve().parents[2]


def _slurm_env(procid: int, nodes: int = 2, tasks_per_node: int = 2,
               nodelist: str = "gpu[07-08]", **extra: str) -> dict[str, str]:
    """The variables srun sets for task `procid` of a block-distributed job."""
    env = dict(SLURM_JOB_ID="4242", SLURM_PROCID=str(procid), SLURM_NTASKS=str(nodes * tasks_per_node),
               SLURM_LOCALID=str(procid % tasks_per_node), SLURM_NODEID=str(procid // tasks_per_node),
               SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(nodes),
               SLURM_NTASKS_PER_NODE=str(tasks_per_node), SLURM_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})")
    env.update(extra)
    return env


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("node7", ["node7"]),
    ("a[9-11],b1,c[001-002]", ["a9", "a10", "a11", "b1", "c001", "c002"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, fragment", [("gpu[03-01]", "bad range '03-01'"),
                                                ("gpu[01-02", "unbalanced"), ("gpu[x]", "bad range 'x'")])
def test_bad_nodelist(nodelist, fragment):
    with pytest.raises(LaunchError, match=fragment.replace("[", r"\[")):
        expand_nodelist(nodelist)


def test_slurm_two_nodes_two_tasks_each():
    seen = []
    for procid in range(4):
        e = read_launch_env(_slurm_env(procid))
        seen.append((e.rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank, e.num_nodes))
        assert e.launcher == "slurm" and e.master_addr == "gpu07"
        assert e.master_port == 20000 + 4242 % 20000
    assert seen == [(0, 4, 0, 2, 0, 2), (1, 4, 1, 2, 0, 2), (2, 4, 0, 2, 1, 2), (3, 4, 1, 2, 1, 2)]
    # SLURM_NODELIST (older SLURM) and an explicit MASTER_ADDR / MASTER_PORT
    env = _slurm_env(3, nodelist="x")
    env.pop("SLURM_JOB_NODELIST")
    env.update(SLURM_NODELIST="cn[10-11]", MASTER_PORT="31000")
    e = read_launch_env(env)
    assert (e.master_addr, e.master_port) == ("cn10", 31000)
    assert read_launch_env(_slurm_env(1, MASTER_ADDR="10.0.0.5")).master_addr == "10.0.0.5"


def test_torchrun_wins_over_slurm_and_single_process_default():
    env = _slurm_env(0, RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4",
                     GROUP_RANK="1", MASTER_ADDR="h0", MASTER_PORT="1234")
    e = read_launch_env(env)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.node_rank, e.num_nodes) == \
        ("torchrun", 5, 8, 1, 1, 2)
    single = read_launch_env({})
    assert (single.launcher, single.rank, single.world_size) == ("single", 0, 1)


@pytest.mark.parametrize("change, fragment", [
    (dict(SLURM_NTASKS="5"), "SLURM_NTASKS=5"),
    (dict(SLURM_NODEID="0"), "node rank=0"),
    (dict(SLURM_LOCALID="0"), "local rank=0"),
    (dict(SLURM_PROCID="9"), "rank=9 is outside"),
    (dict(SLURM_JOB_NODELIST="gpu01"), "has 1 hosts but SLURM_JOB_NUM_NODES=2"),
    (dict(SLURM_LOCALID="one"), "SLURM_LOCALID='one': expected an integer"),
    (dict(MASTER_PORT="70000"), "MASTER_PORT=70000"),
])
def test_inconsistent_slurm_env_fails_with_a_clear_message(change, fragment):
    env = _slurm_env(3)
    env.update(change)
    with pytest.raises(LaunchError) as err:
        read_launch_env(env)
    assert fragment in str(err.value)
    env = _slurm_env(0)
    env.pop("SLURM_JOB_NODELIST")
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST"):
        read_launch_env(env)


_WORKER = """
import json, os, signal, sys, torch, torch.distributed as dist
from vcppo_megatron.parallel.launch import init_distributed
from vcppo_megatron.trainer.signals import CheckpointRequest
with CheckpointRequest((signal.SIGUSR1,)) as stop:
    e = init_distributed(timeout_s=60)
    t = torch.tensor([float(e.rank + 1)])
    dist.all_reduce(t)
    before = stop.requested(dist.group.WORLD)
    if e.rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)     # only rank 1 is signalled
    after = stop.requested(dist.group.WORLD)
print(json.dumps(dict(rank=e.rank, world=e.world_size, local=e.local_rank, node=e.node_rank,
                      launcher=e.launcher, backend=dist.get_backend(), dist_rank=dist.get_rank(),
                      dist_world=dist.get_world_size(), sum=t.item(), before=before, after=after)))
dist.destroy_process_group()
"""


def test_two_tasks_under_simulated_slurm_init_and_all_reduce():
    """Two real processes with srun's variables (1 node x 2 tasks): gloo init, all_reduce, and a
    CheckpointRequest flag raised by SIGUSR1 on one rank reaching both over the launched group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for procid in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                          "LOCAL_", "MASTER_"))}
        env.update(_slurm_env(procid, nodes=1, tasks_per_node=2, nodelist="localhost"),
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [(r["rank"], r["dist_rank"], r["local"], r["node"]) for r in results] == [(0, 0, 0, 0), (1, 1, 1, 0)]
    for r in results:
        assert r["world"] == r["dist_world"] == 2 and r["launcher"] == "slurm" and r["backend"] == "gloo"
        assert r["sum"] == 3.0
        assert r["before"] is False and r["after"] is True   # one rank's signal stops every rank


def test_srun_task_exports_the_torchrun_variables():
    """srun sets only SLURM_*: the torchrun variables vLLM's external launcher reads are exported."""
    from vcppo_megatron.parallel.launch import export_launch_env

    environ = _slurm_env(3, MASTER_PORT="29555")
    exported = export_launch_env(read_launch_env(environ), environ)
    assert exported == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                        "GROUP_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29555"}
    assert all(environ[k] == v for k, v in exported.items())
    assert read_launch_env(environ).rank == 3          # read back as torchrun's: the same process
    clash = _slurm_env(3, LOCAL_RANK="0")
    with pytest.raises(LaunchError, match=r"'LOCAL_RANK': \('0', '1'\)"):
        export_launch_env(read_launch_env(clash), clash)
