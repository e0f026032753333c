"""Benchmark PolicyEngine.forward_backward (tokens/s, peak memory) for an HF config at a TP/PP
layout, and in the same run the peak memory of the chunked vocab-parallel log-prob head against
the unchunked one (dense fp32 logits + log_softmax + entropy under autograd), as a ratio.

    python tools/bench_train.py --device cpu --tiny                        # smoke run on CPU
    torchrun --nproc_per_node=8 tools/bench_train.py --device cuda --hf-config cfg.json \\
        --tp 4 --pp 2 --rows 16 --seq 4096 --dtype bfloat16

Random weights (Megatron's init); rows have random lengths in [seq/2, seq]. Peak memory is
torch.cuda.max_memory_allocated on CUDA and sampled process RSS growth on CPU (coarse).
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
from vcppo_megatron.platform import setup_device  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TINY = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=True)


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
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _batch(rows: int, seq: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded rows with lengths in [seq/2, seq]."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(1, seq // 2), seq + 1, (rows,), generator=g)
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
    p.add_argument("--hf-config", help="path to an HF config.json (Qwen2 / Llama-3)")
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
    if args.tiny == bool(args.hf_config):
        p.error("give exactly one of --tiny or --hf-config")
    if args.tiny:
        args.seq, args.rows = min(args.seq, 64), min(args.rows, 4)
        args.max_tokens_per_micro_batch = min(args.max_tokens_per_micro_batch, 128)
        args.chunk = min(args.chunk, 32)
    cfg = TINY if args.tiny else json.loads(Path(args.hf_config).read_text())
    rank, world = _init_dist(args.device)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    pgs, layout = build_role_groups(args.tp, args.pp)
    engine = PolicyEngine(cfg, pgs, layout, optim=OptimConfig(lr=1e-6),
                          logprob_chunk_size=args.chunk, params_dtype=DTYPES[args.dtype],
                          max_tokens_per_micro_batch=args.max_tokens_per_micro_batch)
    batch = _batch(args.rows, args.seq, cfg["vocab_size"], device)
    real = int(batch["attention_mask"].sum())
    computed = computed_tokens(split_micro_batches(batch, args.max_tokens_per_micro_batch))
    loss_fn = _loss(float(real))
    times = []
    with engine.train_mode(), PeakMemory(device) as mem:
        for i in range(args.steps + 1):                     # the first is a warm-up
            engine.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.forward_backward(batch, loss_fn)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    dt = min(times)
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  world=world, tp=args.tp, pp=args.pp, dp=layout.dp, dtype=args.dtype,
                  rows_per_dp_rank=args.rows, seq=args.seq, real_tokens_per_dp_rank=real,
                  computed_tokens_per_dp_rank=computed, fwd_bwd_s=round(dt, 4),
                  tokens_per_s=round(real * layout.dp / dt, 1),
                  peak_mem_fwd_bwd_mib=round(mem.peak / 2**20, 1))
    if rank == 0:
        tokens = args.head_tokens or min(args.rows * args.seq, 8192)
        head_args = (tokens, cfg["hidden_size"], cfg["vocab_size"] // args.tp, args.chunk,
                     args.device, args.dtype)
        chunked, dense = head_peak(True, *head_args), head_peak(False, *head_args)
        result.update(head_tokens=tokens, head_vocab_per_tp_rank=cfg["vocab_size"] // args.tp,
                      head_chunk=args.chunk, head_peak_chunked_mib=round(chunked / 2**20, 2),
                      head_peak_unchunked_mib=round(dense / 2**20, 2),
                      head_peak_ratio_chunked_over_unchunked=round(chunked / max(dense, 1), 4))
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
