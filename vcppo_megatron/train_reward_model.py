"""Train the reward model baseline PPO's critic starts from (one process; vcppo_megatron/trainer/reward_model.py).

    python -m vcppo_megatron.train_reward_model --config RECIPE.yaml actor.model_path=SFT_POLICY \\
        [reward_model.output_dir=DIR] [section.key=value ...]

SFT_POLICY is an HF directory or a Megatron checkpoint (e.g. a run's `checkpoints/actor`). The
written directory is what `critic.model_path` (with `critic.init_from=reward_model`) loads.
Exit codes: 0 done, 2 bad config or input.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train and write the reward model; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. examples/tiny_cot_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.model_path=DIR")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

    import torch.distributed as dist

    from vcppo_megatron.config import ConfigError, load_config
    from vcppo_megatron.data.prompts import BadRowError
    from vcppo_megatron.platform import setup_device

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        print("error: train_reward_model runs in one process; launch it without torchrun / srun", file=sys.stderr)
        return EXIT_BAD_INPUT
    setup_device()
    if not dist.is_initialized():                     # prompt loading reports on rank 0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from vcppo_megatron.trainer.reward_model import train_reward_model

    try:
        result = train_reward_model(cfg)
    except (ConfigError, BadRowError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result.metrics, indent=2))
    print(f"== reward model written to {result.output_dir} (critic.model_path={result.output_dir} "
          f"critic.init_from=reward_model)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
