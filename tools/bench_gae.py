"""Benchmark fused decoupled GAE against the peers' baseline (a masked per-time-step loop, run
once per λ) on the same device in one run; on CUDA also the fraction of the memory-bandwidth floor.

    python tools/bench_gae.py --batch 1024 --seq 8192 --device cpu --repeats 5 --baseline-repeats 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vcppo_megatron.algorithms.gae import decoupled_gae, naive_gae_loop  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of `repeats` calls (CUDA-synchronised)."""
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def copy_rate(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, bytes read + written per second (large buffer)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = min(timed(lambda: dst.copy_(src), 10, device))
    return 2 * nbytes / t


def make_inputs(batch: int, seq: int, dtype: torch.dtype, mask_dtype: str,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded responses (lengths in [seq/2, seq]), terminal ±1 reward, random values."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    rewards = torch.zeros(batch, seq)
    rewards[torch.arange(batch), lengths - 1] = torch.randint(0, 2, (batch,), generator=g) * 2.0 - 1
    values = torch.randn(batch, seq, generator=g)
    mask = mask if mask_dtype == "bool" else mask.float()
    return rewards.to(device, dtype), values.to(device, dtype), mask.to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of the fused op")
    p.add_argument("--baseline-repeats", type=int, default=1, help="timed baseline runs")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="rewards/values")
    p.add_argument("--mask-dtype", choices=["float", "bool"], default="float")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam-actor", type=float, default=0.95)
    p.add_argument("--lam-critic", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    r, v, m = make_inputs(a.batch, a.seq, DTYPES[a.dtype], a.mask_dtype, dev)
    tokens = a.batch * a.seq
    kw = dict(gamma=a.gamma, lam_actor=a.lam_actor, lam_critic=a.lam_critic)

    def fused():
        return decoupled_gae(r, v, m, **kw)

    bufs = tuple(torch.empty(a.batch, a.seq, device=dev) for _ in range(2))

    def fused_out():                                                   # reused output buffers
        return decoupled_gae(r, v, m, out=bufs, **kw)

    def baseline():
        adv, _ = naive_gae_loop(r, v, m, a.gamma, a.lam_actor)
        _, ret = naive_gae_loop(r, v, m, a.gamma, a.lam_critic)
        return adv, ret

    for _ in range(3):                                                 # warm-up (and compile)
        adv, ret = fused()
    naive_gae_loop(r[:, :64], v[:, :64], m[:, :64], a.gamma, a.lam_actor)
    t_fused = timed(fused, a.repeats, dev)
    fused_out()
    t_out = timed(fused_out, a.repeats, dev)
    t_base = timed(baseline, a.baseline_repeats, dev)
    b_adv, b_ret = baseline()
    err = max(float((adv - b_adv.float()).abs().max()), float((ret - b_ret.float()).abs().max()))
    med_f, med_b = statistics.median(t_fused), statistics.median(t_base)
    med_o = statistics.median(t_out)
    rows = [("device", f"{a.device} ({torch.get_num_threads()} threads)" if a.device == "cpu"
             else torch.cuda.get_device_name(dev)),
            ("shape / dtype", f"{a.batch} x {a.seq} / {a.dtype}, mask {a.mask_dtype}"),
            ("tokens", f"{tokens:,}"),
            ("fused decoupled_gae", f"{med_f * 1e3:.2f} ms (median of {a.repeats}, "
                                    f"min {min(t_fused) * 1e3:.2f})"),
            ("fused, out= buffers", f"{med_o * 1e3:.2f} ms (median of {a.repeats}, "
                                    f"min {min(t_out) * 1e3:.2f})"),
            ("baseline 2 x naive loop", f"{med_b * 1e3:.1f} ms (median of {a.baseline_repeats})"),
            ("speed-up", f"{med_b / med_f:.1f}x (out= buffers: {med_b / med_o:.1f}x)"),
            ("max |fused - baseline|", f"{err:.2e}")]
    if dev.type == "cuda":
        nbytes = (r.numel() * r.element_size() + v.numel() * v.element_size()
                  + m.numel() * m.element_size() + 2 * tokens * 4)
        rate = copy_rate(dev)
        floor = nbytes / rate
        rows += [("copy rate (read+write)", f"{rate / 1e12:.2f} TB/s"),
                 ("bandwidth floor", f"{floor * 1e3:.3f} ms ({nbytes / 2**20:.0f} MiB)"),
                 ("fraction of floor", f"{floor / med_f:.2f} (out= buffers: {floor / med_o:.2f})")]
        from vcppo_megatron.algorithms.gae_triton import decoupled_gae_triton, pick_schedule

        rows.append(("automatic Triton schedule", pick_schedule(a.batch, dev)))
        for schedule in ("single", "two_pass"):                        # each one, out= buffers
            def run(schedule=schedule):
                return decoupled_gae_triton(r, v, m, schedule=schedule, out=bufs, **kw)
            run()
            s_adv, s_ret = bufs[0].clone(), bufs[1].clone()
            t = statistics.median(timed(run, a.repeats, dev))
            diff = max(float((s_adv - adv).abs().max()), float((s_ret - ret).abs().max()))
            rows.append((f"schedule {schedule!r}", f"{t * 1e3:.3f} ms, {floor / t:.2f} of floor, "
                                                   f"{med_b / t:.0f}x, max |diff| vs fused {diff:.1e}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"| {k:<{width}} | {val} |" for k, val in rows))


if __name__ == "__main__":
    main()
