"""Validate a recipe's parallel layout on a cluster; print its per-GPU memory timeline and the
preemption margin for its sbatch script.

    python tools/plan.py --config examples/qwen2.5_32b_vapo.yaml --nodes 8 --gpus-per-node 8
    python tools/plan.py --config ... --nodes 8 --gpus-per-node 8 --step-seconds 3600 --write-gbps 10

The timeline (vcppo_megatron/parallel/memory_timeline.py) is the one the trainer's colocation code
follows: per phase of the start, of an RL step and of a value-pretraining step, the bytes each part
holds on one GPU. Reads the model shape from `<actor.model_path>/config.json`; when that path is not
reachable (planning off the cluster) it uses examples/models/<basename of model_path>/config.json,
or the file given with --model-config. Exits 1 with a message naming what does not fit. CPU only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vcppo_megatron.config.loader import ConfigError, load_config  # noqa: E402
from vcppo_megatron.parallel import preemption  # noqa: E402
from vcppo_megatron.parallel.memory_plan import (COLUMNS, GIB, ModelShape, make_plan,  # noqa: E402
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
    ap.add_argument("--tokens-per-s-per-gpu", type=float, default=None,
                    help="end-to-end step throughput per GPU for the step-time estimate (measured: "
                         "perf/tokens_per_s / GPUs); default 400 for a 32B model, scaled inversely "
                         "with the model's parameters")
    ap.add_argument("--step-seconds", type=float, default=None,
                    help="measured longest step (largest time/step_s); replaces the estimate")
    ap.add_argument("--write-gbps", type=float, default=preemption.WRITE_BYTES_PER_S / 1e9,
                    help="checkpoint file-system write bandwidth of the job, GB/s")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.parallel.tensor_parallel_size=4")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        source = model_config_path(cfg.actor.model_path, args.model_config)
        hf = read_hf_config(source)
        plan = make_plan(cfg, hf, args.nodes, args.gpus_per_node, args.gpu_memory_gib, str(source))
        shape = ModelShape.from_hf(hf, str(source))
        world = args.nodes * args.gpus_per_node
        margin = preemption.preemption_margin(
            cfg, world, sum(shape.params(lm_head=True)), sum(shape.params(lm_head=False)),
            tokens_per_s_per_gpu=args.tokens_per_s_per_gpu, write_bytes_per_s=args.write_gbps * 1e9,
            step_seconds=args.step_seconds)
    except (ConfigError, ValueError) as err:
        print(f"plan: does not fit: {err}", file=sys.stderr)
        return 1
    print(f"model: {source}\ncluster: {args.nodes} nodes x {args.gpus_per_node} GPUs = {world} GPUs of "
          f"{args.gpu_memory_gib:g} GiB; seq = {cfg.rollout.max_prompt_tokens} + "
          f"{cfg.rollout.max_response_tokens} tokens; micro_batch_size = {cfg.batch.micro_batch_size}")
    from vcppo_megatron.config.batch_sizes import derive_batch_sizes
    print(derive_batch_sizes(cfg, world).describe())
    tl = plan.timeline
    print(f"layouts: actor {plan.layouts['actor']}, critic {plan.layouts['critic']}, rollout "
          f"TP{cfg.rollout.tensor_parallel_size} x {world // cfg.rollout.tensor_parallel_size} engines")
    print(f"memory timeline per GPU (GiB; rollout.sleep_level={tl.sleep_level}, "
          f"trainer.offload_during_rollout={str(tl.offload).lower()}):")
    print(plan.table())
    print("  " + ", ".join(f"{short}={name}" for name, short in COLUMNS) + "; host = bytes per GPU in host memory")
    peak = plan.peak
    host = max(sum(r.host.values()) for r in plan.rows)
    print(f"peak: {peak.total / GIB:.1f} of {args.gpu_memory_gib:g} GiB ({peak.phase}, {peak.step}); KV cache "
          f"{plan.kv_cache_bytes / GIB:.1f} GiB per GPU = {plan.kv_sequences:.0f} full-length sequences per engine"
          f"; vLLM's own share {plan.vllm_fraction:.3f} of the GPU; host memory up to "
          f"{host / GIB:.1f} GiB per GPU = {host * args.gpus_per_node / GIB:.0f} GiB per node")
    print(margin.describe())
    print("  margin = T_step + T_eval + T_checkpoint + T_exit: formula and assumptions in slurm/README.md")
    print("OK: the layout fits. Assumptions of the memory timeline:\n"
          + ASSUMPTIONS.split("Assumptions, printed with the plan:\n", 1)[1].rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
