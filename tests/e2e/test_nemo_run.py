"""examples/launch.py against the real NeMo-Run package (the `launch` extra).

- Slurm executor, dry run: the sbatch script NeMo-Run would submit passes shellcheck (apart from
  the findings in NeMo-Run's own fixed preamble, listed below) and its srun starts the command the
  repository's sbatch scripts start (slurm/common.sh), with the same geometry and NCCL settings.
- Local executor (torchrun, 2 processes): the tiny recipe for a few steps on CPU, through NeMo-Run.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
try:
    import nemo_run  # noqa: F401
except ImportError as err:                       # a failure, not a skip: `make setup` installs it
    raise ImportError(f"NeMo-Run is missing ({err}): `make setup` installs it (the launch extra of setup.py "
                      f"plus `pip install --no-deps nemo-run==0.11.1 torchx==0.7.0 leptonai==0.27.3`)") from err

# shellcheck findings in NeMo-Run 0.11.1's fixed template (core/execution/templates/slurm.sh.j2 and the
# srun --output path it builds), by the start of the line: not in what this repository generates
TEMPLATE_FINDINGS = {("nodes=(", 2207), ("nodes=(", 2086), ("nodes_array=(", 2128), ("nodes_array=(", 2206),
                     ("head_node_ip=", 2034), ("srun --output", 2086)}


def _launch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("examples_launch", ROOT / "examples" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _shellcheck() -> str:
    found = Path(sys.executable).parent / "shellcheck"
    return str(found) if found.exists() else "shellcheck"


def _sbatch_command(recipe: Path, run_dir: str, overrides: list[str]) -> list[str]:
    """The command slurm/common.sh's srun starts (in a container: PYTHON=python), tokens expanded."""
    text = (ROOT / "slurm" / "common.sh").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith('srun "${SRUN_ARGS[@]}"'))
    tokens = shlex.split(line.split(">>")[0])[2:]                  # after: srun "${SRUN_ARGS[@]}"
    values = {"$PYTHON": ["python"], "$TRAIN_MODULE": ["vcppo_megatron.train"], "$RECIPE": [str(recipe)],
              "trainer.output_dir=$RUN_DIR": [f"trainer.output_dir={run_dir}"], "$@": overrides}
    return [v for t in tokens for v in values.get(t, [t])]


def _nemo_run_env(tmp_path: Path, monkeypatch) -> None:
    """NeMo-Run's home under tmp_path; a real stdin (its local tunnel runs shell commands through
    invoke, which reads stdin: pytest's capture stand-in raises)."""
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "home"))
    devnull = open(os.devnull)                                 # noqa: SIM115 - closed with the test
    monkeypatch.setattr(sys, "stdin", devnull)


def test_slurm_dry_run_script_passes_shellcheck_and_starts_the_sbatch_command(tmp_path, monkeypatch):
    _nemo_run_env(tmp_path, monkeypatch)
    launch = _launch_module()
    recipe = ROOT / "examples" / "qwen2.5_32b_vapo.yaml"
    overrides = ["algo.lam_actor=0.99", "trainer.num_steps=3"]
    spec = launch.build_spec(["slurm", "--recipe", str(recipe), "--account", "acc", "--partition", "batch",
                              "--container-image", "img.sqsh", "--output-dir", "/runs/vapo", "--job-dir",
                              str(tmp_path / "jobs"), *overrides])
    script = launch.slurm_dryrun_script(spec)
    path = tmp_path / "sbatch.sh"
    path.write_text(script)
    out = subprocess.run([_shellcheck(), "-s", "bash", "-f", "json1", str(path)], capture_output=True, text=True)
    lines = script.splitlines()
    findings = json.loads(out.stdout)["comments"]
    unexpected = [f for f in findings if not any(lines[f["line"] - 1].startswith(prefix) and f["code"] == code
                                                 for prefix, code in TEMPLATE_FINDINGS)]
    assert not unexpected, json.dumps(unexpected, indent=1) + "\n" + script
    # the srun line starts what slurm/common.sh starts
    srun = next(ln for ln in lines if ln.startswith("srun ") and " -m vcppo_megatron.train" in ln)
    tokens = shlex.split(srun)
    command = tokens[tokens.index("python"):]
    assert command == _sbatch_command(recipe, "/runs/vapo", overrides), command
    assert "--container-image=img.sqsh" in srun or "--container-image img.sqsh" in srun, srun
    # geometry and settings as slurm/vapo_32b.sbatch / common.sh
    sbatch = (ROOT / "slurm" / "vapo_32b.sbatch").read_text()
    for key in ("nodes", "ntasks-per-node", "gpus-per-node"):
        want = re.search(rf"^#SBATCH --{key}=(\d+)", sbatch, re.M).group(1)
        assert f"#SBATCH --{key}={want}" in script, key
    assert "#SBATCH --exclusive" in script
    common = (ROOT / "slurm" / "common.sh").read_text()
    for name, value in launch.NCCL_ENV.items():
        assert f"export {name}={value}" in script and f'{name}="${{{name}:-{value}}}"' in common, name
    assert f"export PYTHONPATH={ROOT}" in script


@pytest.mark.slow
def test_local_executor_runs_the_tiny_recipe_with_torchrun(tmp_path, monkeypatch):
    """Two torchrun processes started by NeMo-Run's Local executor: SFT, value pretraining, RL."""
    _nemo_run_env(tmp_path, monkeypatch)
    launch = _launch_module()
    out = tmp_path / "run"
    spec = launch.build_spec([
        "local", "--recipe", str(ROOT / "examples" / "tiny_cpu.yaml"), "--gpus-per-node", "2",
        "--output-dir", str(out), "--env", "OMP_NUM_THREADS=1", "--env", "CUDA_VISIBLE_DEVICES=",
        "trainer.sft_steps=2", "trainer.value_pretrain_steps=1", "trainer.num_steps=2", "trainer.eval_problems=8",
        "trainer.eval_samples=2", "trainer.eval_every_steps=0", "trainer.checkpoint_interval=100"])
    launch.launch(spec)
    from vcppo_megatron.checkpoint import read_checkpoint_meta, resolve_checkpoint_dir

    actor = resolve_checkpoint_dir(out / "checkpoints" / "actor")
    meta = read_checkpoint_meta(actor)
    assert actor.name == "step_00000003" and meta["layout"]["world_size"] == 2, (actor, meta["layout"])
    state = json.loads((actor / "training_state.json").read_text())
    assert state["phase"] == "done", state
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"
