"""The trainer entry point; every rank runs the same program.

    python -m vcppo_megatron.train --config RECIPE.yaml [section.key=value ...]
    torchrun --nproc-per-node 2 -m vcppo_megatron.train --config examples/tiny_cpu.yaml
    srun ... python -m vcppo_megatron.train --config examples/qwen2.5_32b_vcppo.yaml   (slurm/)

Phases (VC-PPO Alg. 1): SFT cold start (optional) -> value pretraining -> RL; see
`vcppo_megatron/trainer/loop.py`. A run resumes from the latest checkpoint under
`trainer.output_dir`. Exit codes: 0 finished, 2 bad config or input, 3 stopped by SIGTERM /
SIGUSR1 after writing a checkpoint (the sbatch scripts requeue the job).
"""
from __future__ import annotations

import argparse
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, set up the process group and run the trainer; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. examples/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.lam_actor=0.99")
    args = parser.parse_args(argv)
    # vLLM logs every weight reload at INFO; keep the progress lines readable unless asked for
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

    import torch.distributed as dist

    from vcppo_megatron.config import ConfigError, load_config
    from vcppo_megatron.data.prompts import BadRowError
    from vcppo_megatron.parallel.launch import LaunchError, init_distributed
    from vcppo_megatron.platform import setup_device

    try:
        cfg = load_config(args.config, args.overrides)
        launch = init_distributed()
    except (ConfigError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    setup_device(launch.local_rank)
    from vcppo_megatron.trainer.loop import Trainer

    try:
        summary = Trainer(cfg).run()
    except (ConfigError, BadRowError, FileNotFoundError) as err:
        print(f"[rank {launch.rank}] error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    dist.barrier()
    return EXIT_STOPPED if summary.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
