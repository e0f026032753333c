"""Benchmark a training step of PolicyEngine (forward_backward, then the optimizer step): tokens/s,
model TFLOP/s per GPU and peak memory, for an HF config at a TP/PP layout; and in the same run the
peak memory of the chunked vocab-parallel log-prob + entropy head against the unchunked one (dense
fp32 logits + log_softmax + entropy under autograd), as a ratio.

    python tools/bench_train.py --device cpu --tiny                        # smoke run on CPU
    python tools/bench_train.py --shape qwen2.5-1.5b --seq 16384 --rows 1 --lengths full \\
        --dtype bfloat16 --head-tokens 16384                               # one H100 (issue 4)
    torchrun --nproc_per_node=8 tools/bench_train.py --hf-config cfg.json --tp 4 --pp 2 \\
        --rows 16 --seq 4096 --dtype bfloat16 --sequence-parallel --recompute full

Random weights (Megatron's init). Rows have random lengths in [seq/2, seq] (`--lengths random`) or
all `seq` tokens (`--lengths full`). Model FLOPs per step = sum over rows of 6·N·l + 6·L·h·l²
(N parameters with a tied embedding counted once, as the LM-head matmul; L layers; h hidden size;
l the row's real tokens; causal attention), the convention of docs/PERFORMANCE.md (the usual
6·N·tokens plus causal attention): padding and recomputation are not counted. Peak memory is torch.cuda.max_memory_allocated on CUDA and
sampled process RSS growth on CPU (coarse).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vcppo_megatron.config.schema import OptimConfig  # noqa: E402
from vcppo_megatron.engines import PolicyEngine, split_micro_batches, computed_tokens  # noqa: E402
from vcppo_megatron.engines.logprobs import vocab_parallel_logprobs  # noqa: E402
from vcppo_megatron.parallel.groups import build_role_groups  # noqa: E402
from vcppo_megatron.parallel.launch import GPU_BACKEND  # noqa: E402
from vcppo_megatron.platform import setup_device  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(_QWEN2, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
# the shapes of the published Qwen2.5 configs (random weights here)
SHAPES = {
    "qwen2.5-0.5b": dict(_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768),
}


def param_count(cfg: dict[str, Any]) -> int:
    """Parameters of a Qwen2 / Llama config (tied embedding once; q/k/v biases when Qwen2)."""
    h, f, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    attn = h * heads * d * 2 + h * kv * d * 2 + (heads * d + 2 * kv * d if cfg["model_type"] == "qwen2" else 0)
    layer = attn + 3 * h * f + 2 * h
    return L * layer + h + v * h * (1 if cfg.get("tie_word_embeddings") else 2)


def model_flops(cfg: dict[str, Any], lengths: torch.Tensor) -> float:
    """Training FLOPs of one step over rows of these lengths (see the module docstring)."""
    n, L, h = param_count(cfg), cfg["num_hidden_layers"], cfg["hidden_size"]
    ls = lengths.double()
    return float((6 * n * ls + 6 * L * h * ls ** 2).sum())


class PeakMemory:
    """Peak memory growth inside a `with` block: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            import psutil

            self._proc, self._stop = psutil.Process(), False
            self._base = self._max = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop:
            self._max = max(self._max, self._proc.memory_info().rss)
            time.sleep(0.0005)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop = True
            self._thread.join()
            self.peak = max(self._max, self._proc.memory_info().rss) - self._base


def _head_peak(chunked: bool, tokens: int, hidden: int, vocab: int, chunk: int, device: str,
               dtype: str, queue: Any = None) -> int:
    """Peak memory of one log-prob + entropy forward/backward over [tokens, vocab]."""
    dev = setup_device() if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(dev, DTYPES[dtype]).requires_grad_(True)
    w = (0.02 * torch.randn(vocab, hidden, generator=g)).to(dev, DTYPES[dtype]).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), generator=g).to(dev)
    with PeakMemory(dev) as mem:
        if chunked:
            lp, ent = vocab_parallel_logprobs(h, w, t, chunk_size=chunk)
        else:
            la = torch.log_softmax((h @ w.t()).float(), -1)
            lp, ent = la.gather(-1, t[:, None])[:, 0], -(la.exp() * la).sum(-1)
        (lp.sum() + 0.01 * ent.sum()).backward()
    if queue is not None:
        queue.put(mem.peak)
    return mem.peak


def head_peak(chunked: bool, *args: Any) -> int:
    """On CPU each measurement runs in a fresh process (RSS high-water marks do not reset)."""
    if args[3] != "cpu":
        return _head_peak(chunked, *args)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_head_peak, args=(chunked, *args, queue))
    proc.start()
    peak = queue.get()
    proc.join()
    return peak


def _init_dist(device: str) -> tuple[int, int]:
    """torch.distributed from torchrun's env, or a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    setup_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(GPU_BACKEND if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _batch(rows: int, seq: int, vocab: int, device: torch.device, full: bool) -> dict[str, torch.Tensor]:
    """Right-padded rows with lengths in [seq/2, seq], or all of length seq."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.full((rows,), seq) if full else torch.randint(max(1, seq // 2), seq + 1, (rows,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return {"input_ids": torch.randint(0, vocab, (rows, seq), generator=g).to(device),
            "attention_mask": mask.to(device)}


def _loss(total_tokens: float) -> Callable:
    def loss_fn(o: dict, mb: dict):
        m = mb["attention_mask"].to(o["log_probs"].dtype)
        return -(o["log_probs"] * m).sum() / total_tokens - 0.01 * (o["entropy"] * m).sum() / total_tokens, {}
    return loss_fn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen2 config (smoke run)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="a published Qwen2.5 shape")
    p.add_argument("--hf-config", help="path to an HF config.json (Qwen2 / Llama-3)")
    p.add_argument("--lengths", choices=("random", "full"), default="random",
                   help="row lengths: random in [seq/2, seq], or all seq")
    p.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (TP > 1)")
    p.add_argument("--recompute", choices=("none", "full"), default="none", help="activation recompute")
    p.add_argument("--no-optimizer-step", action="store_true", help="time forward_backward only")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--rows", type=int, default=8, help="rows per DP rank per step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--max-tokens-per-micro-batch", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=1024, help="log-prob chunk size (tokens)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--head-tokens", type=int, default=None, help="tokens for the head memory test")
    args = p.parse_args()
    if sum((args.tiny, bool(args.hf_config), bool(args.shape))) != 1:
        p.error("give exactly one of --tiny, --shape or --hf-config")
    if args.tiny:
        args.seq, args.rows = min(args.seq, 64), min(args.rows, 4)
        args.max_tokens_per_micro_batch = min(args.max_tokens_per_micro_batch, 128)
        args.chunk = min(args.chunk, 32)
    cfg = TINY if args.tiny else SHAPES[args.shape] if args.shape else json.loads(Path(args.hf_config).read_text())
    rank, world = _init_dist(args.device)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    pgs, layout = build_role_groups(args.tp, args.pp)
    engine = PolicyEngine(cfg, pgs, layout, optim=OptimConfig(lr=1e-6),
                          logprob_chunk_size=args.chunk, params_dtype=DTYPES[args.dtype],
                          max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
                          sequence_parallel=args.sequence_parallel, recompute_activations=args.recompute)
    batch = _batch(args.rows, args.seq, cfg["vocab_size"], device, args.lengths == "full")
    lengths = batch["attention_mask"].sum(1).cpu()
    real = int(lengths.sum())
    computed = computed_tokens(split_micro_batches(batch, args.max_tokens_per_micro_batch, engine.core.seq_multiple))
    loss_fn = _loss(float(real))
    times, fb_times = [], []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with engine.train_mode(), PeakMemory(device) as mem:
        for i in range(args.steps + 1):                     # the first is a warm-up
            engine.zero_grad()
            sync()
            t0 = time.perf_counter()
            engine.forward_backward(batch, loss_fn)
            sync()
            t1 = time.perf_counter()
            if not args.no_optimizer_step:
                engine.step()
                sync()
            if i:
                fb_times.append(t1 - t0)
                times.append(time.perf_counter() - t0)
    dt = min(times)
    flops = model_flops(cfg, lengths) * layout.dp           # every DP rank runs such a batch
    # parameters as built, summed over this rank's TP and PP groups: TP-replicated ones (norms)
    # once, and a tied embedding's second copy on the last pipeline stage not again
    built = torch.tensor(float(sum(
        p.numel() for n, p in engine.core.raw_model.named_parameters()
        if (getattr(p, "tensor_model_parallel", False) or layout.tp_rank == 0)
        and not (n == "output_layer.weight" and layout.pp > 1 and cfg.get("tie_word_embeddings")))))
    for group in (engine.core.pgs.tp, engine.core.pgs.pp):
        dist.all_reduce(built, group=group)
    built = int(built)
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  model=args.shape or ("tiny" if args.tiny else args.hf_config), params=param_count(cfg),
                  params_built=built,
                  world=world, tp=args.tp, pp=args.pp, dp=layout.dp, dtype=args.dtype,
                  sequence_parallel=args.sequence_parallel, recompute=args.recompute,
                  rows_per_dp_rank=args.rows, seq=args.seq, real_tokens_per_dp_rank=real,
                  computed_tokens_per_dp_rank=computed, fwd_bwd_s=round(min(fb_times), 4),
                  step_s=round(dt, 4), optimizer_step_included=not args.no_optimizer_step,
                  tokens_per_s=round(real * layout.dp / dt, 1),
                  model_tflops_per_gpu=float(f"{flops / dt / world / 1e12:.4g}"),
                  peak_mem_step_mib=round(mem.peak / 2**20, 1))
    if rank == 0:
        tokens = args.head_tokens or min(args.rows * args.seq, 8192)
        head_args = (tokens, cfg["hidden_size"], cfg["vocab_size"] // args.tp, args.chunk,
                     args.device, args.dtype)
        chunked, dense = head_peak(True, *head_args), head_peak(False, *head_args)
        result.update(head_tokens=tokens, head_vocab_per_tp_rank=cfg["vocab_size"] // args.tp,
                      head_chunk=args.chunk, head_peak_chunked_mib=round(chunked / 2**20, 2),
                      head_peak_unchunked_mib=round(dense / 2**20, 2),
                      head_peak_ratio_chunked_over_unchunked=round(chunked / max(dense, 1), 4))
        rows = [(k, result[k]) for k in ("device", "model", "params", "dtype", "seq", "real_tokens_per_dp_rank",
                                          "step_s", "fwd_bwd_s", "tokens_per_s", "model_tflops_per_gpu",
                                          "peak_mem_step_mib", "head_peak_chunked_mib",
                                          "head_peak_unchunked_mib")]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"| {k:<{width}} | {v} |" for k, v in rows), flush=True)
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
