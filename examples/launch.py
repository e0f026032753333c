"""Launch the trainer with NeMo-Run: a Slurm executor (pyxis container) or a Local one (torchrun).

    python examples/launch.py slurm --recipe examples/qwen2.5_32b_vapo.yaml --nodes 8 \\
        --account ACC --partition batch --container-image nvcr.io#nvidia/pytorch:25.01-py3 algo.lam_actor=0.99
    python examples/launch.py local --recipe examples/tiny_cpu.yaml --gpus-per-node 2
    python examples/launch.py slurm ... --dry-run          # print the sbatch script NeMo-Run would submit

Both run the same entry point as slurm/*.sbatch: `python -m vcppo_megatron.train --config RECIPE
trainer.output_dir=... OVERRIDES`; the trainer reads its ranks from SLURM or torchrun
(vcppo_megatron.parallel.launch). NeMo-Run is the `launch` extra (`pip install -e ".[launch]"`,
also in `dev`); it is imported only here. tests/e2e/test_nemo_run.py runs the Local executor
(torchrun, 2 processes, the tiny recipe) and checks the Slurm executor's dry-run script.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_MODULE = "vcppo_megatron.train"
NCCL_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}


@dataclass
class LaunchSpec:
    """What to run and where, independent of NeMo-Run (so it can be printed and tested)."""

    executor: str
    module: str
    args: list[str]
    env: dict[str, str]
    executor_kwargs: dict[str, Any] = field(default_factory=dict)

    def command(self) -> str:
        """The command every task runs."""
        return " ".join(["python", "-m", self.module, *self.args])


def build_spec(argv: list[str]) -> LaunchSpec:
    """Parse the command line into a LaunchSpec."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("executor", choices=("slurm", "local"))
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--output-dir", default=None, help="trainer.output_dir (default: the recipe's)")
    ap.add_argument("--account", default=None)
    ap.add_argument("--partition", default=None)
    ap.add_argument("--time", default="48:00:00")
    ap.add_argument("--container-image", default=None)
    ap.add_argument("--container-mounts", nargs="*", default=[])
    ap.add_argument("--job-dir", default=str(ROOT / "runs" / "nemo_run"), help="NeMo-Run's job directory")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment variable of every task (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the launch and exit")
    ap.add_argument("overrides", nargs="*", help="section.key=value, passed to the trainer")
    a = ap.parse_intermixed_args(argv)
    recipe = Path(a.recipe).resolve()
    if not recipe.is_file():
        ap.error(f"--recipe {a.recipe}: file not found")
    args = ["--config", str(recipe)]
    if a.output_dir:
        args.append(f"trainer.output_dir={a.output_dir}")
    args += a.overrides
    env = dict(NCCL_ENV, PYTHONPATH=str(ROOT))
    for item in a.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    if a.executor == "local":
        return LaunchSpec("local", TRAIN_MODULE, args, env,
                          dict(ntasks_per_node=a.gpus_per_node, launcher="torchrun"))
    if a.account is None or a.partition is None:
        ap.error("slurm: --account and --partition are required")
    kwargs: dict[str, Any] = dict(account=a.account, partition=a.partition, nodes=a.nodes,
                                  ntasks_per_node=a.gpus_per_node, gpus_per_node=a.gpus_per_node,
                                  time=a.time, exclusive=True, job_dir=a.job_dir)
    if a.container_image:
        kwargs.update(container_image=a.container_image,
                      container_mounts=[f"{ROOT}:{ROOT}", *a.container_mounts])
    return LaunchSpec("slurm", TRAIN_MODULE, args, env, kwargs)


def import_nemo_run() -> Any:
    """Import nemo_run or exit with how to install it."""
    try:
        import nemo_run
    except ImportError as err:
        raise SystemExit(f"examples/launch.py needs NeMo-Run ({err}): pip install nemo_run, or this package's "
                         f"launch extra, pip install -e \".[launch]\" (Ray included). Without it use "
                         f"`sbatch slurm/vcppo_32b.sbatch` or torchrun directly.") from None
    return nemo_run


def nemo_run_objects(spec: LaunchSpec) -> tuple[Any, Any]:
    """NeMo-Run's task (`run.Script`, `python -m MODULE ARGS`) and executor for `spec`."""
    run = import_nemo_run()
    task = run.Script(path=spec.module, args=spec.args, entrypoint="python", m=True)
    kwargs = dict(spec.executor_kwargs)
    if spec.executor == "local":
        return task, run.LocalExecutor(env_vars=spec.env, **kwargs)
    job_dir = kwargs.pop("job_dir")
    return task, run.SlurmExecutor(env_vars=spec.env, tunnel=run.LocalTunnel(job_dir=job_dir), **kwargs)


def slurm_dryrun_script(spec: LaunchSpec) -> str:
    """The sbatch script NeMo-Run's Slurm executor would submit for `spec` (nothing is submitted)."""
    if spec.executor != "slurm":
        raise ValueError(f"executor {spec.executor!r}: the dry-run script exists for slurm only")
    run = import_nemo_run()
    task, executor = nemo_run_objects(spec)
    with run.Experiment("vcppo", executor=executor, log_level="ERROR") as exp:
        exp.add(task, name="train")
        exp.dryrun(log=False, delete_exp_dir=False)
        return exp.jobs[0]._dryrun_info.request.materialize()


def launch(spec: LaunchSpec) -> None:
    """Build the NeMo-Run task and executor from `spec` and run it (waits for a local run)."""
    run = import_nemo_run()
    task, executor = nemo_run_objects(spec)
    if spec.executor == "local" and shutil.which("torchrun") is None:
        # NeMo-Run starts `torchrun` from PATH: take this interpreter's (an unactivated venv)
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    run.run(task, executor=executor, name="vcppo")


def main(argv: list[str] | None = None) -> None:
    """Parse, then print (--dry-run) or launch."""
    argv = sys.argv[1:] if argv is None else argv
    spec = build_spec(argv)
    if "--dry-run" in argv:
        print(f"executor: {spec.executor} {spec.executor_kwargs}\nenv: {spec.env}\ncommand: {spec.command()}")
        if spec.executor == "slurm":
            print(slurm_dryrun_script(spec))
        return
    launch(spec)


if __name__ == "__main__":
    main()
