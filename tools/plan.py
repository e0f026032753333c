"""Validate a recipe's parallel layout on a cluster and print a per-GPU memory plan per role.

    python tools/plan.py --config examples/qwen2.5_32b_vapo.yaml --nodes 8 --gpus-per-node 8

Reads the model shape from `<actor.model_path>/config.json`; when that path is not reachable
(planning off the cluster) it uses examples/models/<basename of model_path>/config.json, or the
file given with --model-config. Exits 1 with a message naming what does not fit. CPU only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vcppo_megatron.config.loader import ConfigError, load_config  # noqa: E402
from vcppo_megatron.parallel.memory_plan import (RESERVED_BYTES, GIB, make_plan,  # noqa: E402
                                                  read_hf_config, __doc__ as ASSUMPTIONS)


def model_config_path(model_path: str | None, explicit: str | None) -> Path:
    """The config.json to plan with: --model-config, else model_path's, else examples/models/<name>."""
    if explicit:
        return Path(explicit)
    if model_path is None:
        raise ConfigError("actor.model_path is null (the tiny random model): nothing to plan; "
                          "pass --model-config PATH/config.json")
    on_cluster = Path(model_path) / "config.json"
    if on_cluster.is_file():
        return on_cluster
    parts = Path(model_path).name.split("-")   # Qwen2.5-32B-SFT -> Qwen2.5-32B-SFT, Qwen2.5-32B, ...
    for n in range(len(parts), 0, -1):
        local = ROOT / "examples" / "models" / "-".join(parts[:n]) / "config.json"
        if local.is_file():
            return local
    local = ROOT / "examples" / "models" / Path(model_path).name / "config.json"
    raise ConfigError(f"actor.model_path={model_path!r}: {on_cluster} not found and no {local}; "
                      f"pass --model-config PATH/config.json")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, plan, print; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML recipe")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (H100: 80)")
    ap.add_argument("--model-config", default=None, help="HF config.json (default: from actor.model_path)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.parallel.tensor_parallel_size=4")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        source = model_config_path(cfg.actor.model_path, args.model_config)
        plans = make_plan(cfg, read_hf_config(source), args.nodes, args.gpus_per_node,
                          args.gpu_memory_gib, str(source))
    except ConfigError as err:
        print(f"plan: does not fit: {err}", file=sys.stderr)
        return 1
    world = args.nodes * args.gpus_per_node
    print(f"model: {source}\ncluster: {args.nodes} nodes x {args.gpus_per_node} GPUs = {world} GPUs of "
          f"{args.gpu_memory_gib:g} GiB; seq = {cfg.rollout.max_prompt_tokens} + "
          f"{cfg.rollout.max_response_tokens} tokens; micro_batch_size = {cfg.batch.micro_batch_size}")
    from vcppo_megatron.config.batch_sizes import derive_batch_sizes
    print(derive_batch_sizes(cfg, world).describe())
    print("per-GPU memory (GiB), each phase alone on the GPU (others offloaded):")
    for plan in plans:
        print("  " + plan.describe(args.gpu_memory_gib * GIB))
    print(f"OK: the layout fits. Reserved {RESERVED_BYTES / GIB:.0f} GiB per GPU.\n"
          + ASSUMPTIONS.split("\n\n", 1)[1].rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
