"""Triton kernels for decoupled GAE: a chunked reverse linear-recurrence scan, parallel over rows
and time (imported lazily by gae.py; runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1).

Recurrence (see gae.py): B_t = b_t + c_t·B_{t+1} with c_t = γλ, b_t = γλ·r_t + (γ − γλ)·V_t on
valid tokens and (c, b) = (1, 0) (identity) on masked ones; A_t = r_t − V_t + B_{t+1} and
returns_t = r_t + B^{λ_critic}_{t+1} on valid tokens (VC-PPO eq. 3-5, VAPO eq. 5 for a per-row λ).
Lane i of the chunk k block holds time t = kC + C−1−i (time reversed by indexing) and the element
of position t+1, so an inclusive prefix scan over lanes gives the *exclusive* suffix B_{t+1}.

Two schedules, both fp32 accumulation:
- "single" (`_row_scan_kernel`, one launch, grid = rows): a program walks its row's chunks from
  the last to the first, scans each chunk in parallel over time and hands the carry B to the
  chunk before. Inputs are read once and outputs written once: the bandwidth floor's traffic.
  Needs enough rows to fill the GPU (each program is serial over its row's chunks).
- "two_pass" (grid = rows x chunks, for few long rows): `_chunk_aggregate_kernel` composes each
  (row, chunk)'s affine maps into one (c, b) pair per λ; `_chunk_scan_kernel` composes the
  aggregates of the later chunks of its row into the incoming carry, rescans its chunk and writes
  both outputs. Inputs are read twice.
"auto" picks "single" when the rows are at least `SINGLE_PASS_ROWS_PER_SM` x the multiprocessors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 1024             # chunk length on CUDA (time steps per program)
SINGLE_PASS_ROWS_PER_SM = 4
SCHEDULES = ("auto", "single", "two_pass")


@triton.jit
def _compose(ca_l, ba_l, cc_l, bc_l, ca_r, ba_r, cc_r, bc_r):
    """(c, b)_l then (c, b)_r: h ↦ b_r + c_r·(b_l + c_l·h), for the actor and the critic carry."""
    return ca_l * ca_r, ba_r + ca_r * ba_l, cc_l * cc_r, bc_r + cc_r * bc_l


@triton.jit
def _chunk_elements(r_ptr, v_ptr, m_ptr, row, chunk, T, gamma, ga, gc, BLOCK: tl.constexpr):
    """Affine elements (c, b) per λ of positions t+1 for lanes t = chunk end … chunk start."""
    lane = tl.arange(0, BLOCK)
    t = chunk * BLOCK + (BLOCK - 1 - lane)
    p = t + 1                                                           # shifted: exclusive scan
    inb = p < T
    off = row.to(tl.int64) * T + p
    r = tl.load(r_ptr + off, mask=inb, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + off, mask=inb, other=0.0).to(tl.float32)
    valid = (tl.load(m_ptr + off, mask=inb, other=0).to(tl.float32) != 0.0) & inb
    ca = tl.where(valid, ga, 1.0)                                       # masked: identity
    ba = tl.where(valid, ga * r + (gamma - ga) * v, 0.0)
    cc = tl.where(valid, gc, 1.0)
    bc = tl.where(valid, gc * r + (gamma - gc) * v, 0.0)
    return t, ca, ba, cc, bc


@triton.jit
def _scan_chunk_and_write(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, row, chunk, T, gamma, ga, gc,
                          carry_a, carry_c, BLOCK: tl.constexpr):
    """Chunk-local exclusive suffix scan applied to the incoming carries (B after the chunk);
    writes A and returns for the chunk and gives B^λa, B^λc_{n(t)} per lane."""
    t, ca, ba, cc, bc = _chunk_elements(r_ptr, v_ptr, m_ptr, row, chunk, T, gamma, ga, gc, BLOCK)
    ca, ba, cc, bc = tl.associative_scan((ca, ba, cc, bc), 0, _compose)
    next_a = ba + ca * carry_a                                          # B^λa_{n(t)}
    next_c = bc + cc * carry_c
    inb = t < T
    off = row.to(tl.int64) * T + t
    r = tl.load(r_ptr + off, mask=inb, other=0.0).to(tl.float32)       # same lines: cache hits
    v = tl.load(v_ptr + off, mask=inb, other=0.0).to(tl.float32)
    valid = tl.load(m_ptr + off, mask=inb, other=0).to(tl.float32) != 0.0
    tl.store(adv_ptr + off, tl.where(valid, r - v + next_a, 0.0), mask=inb)  # A = δ-sum (eq. 3)
    tl.store(ret_ptr + off, tl.where(valid, r + next_c, 0.0), mask=inb)      # A^c + V (eq. 5)
    return next_a, next_c


@triton.jit
def _chunk_aggregate_kernel(r_ptr, v_ptr, m_ptr, ga_ptr, agg_ptr, T, n_chunks, gamma, gc,
                            BLOCK: tl.constexpr):
    """agg[row, chunk] = composition of the chunk's (c, b) per λ: 4 floats (ca, ba, cc, bc)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    ga = tl.load(ga_ptr + row)
    _, ca, ba, cc, bc = _chunk_elements(r_ptr, v_ptr, m_ptr, row, chunk, T, gamma, ga, gc, BLOCK)
    ca, ba, cc, bc = tl.associative_scan((ca, ba, cc, bc), 0, _compose)
    last = tl.arange(0, BLOCK) == BLOCK - 1                             # full-chunk composition
    base = agg_ptr + (row.to(tl.int64) * n_chunks + chunk) * 4
    tl.store(base + 0, tl.sum(tl.where(last, ca, 0.0), 0))
    tl.store(base + 1, tl.sum(tl.where(last, ba, 0.0), 0))
    tl.store(base + 2, tl.sum(tl.where(last, cc, 0.0), 0))
    tl.store(base + 3, tl.sum(tl.where(last, bc, 0.0), 0))


@triton.jit
def _chunk_scan_kernel(r_ptr, v_ptr, m_ptr, ga_ptr, agg_ptr, adv_ptr, ret_ptr, T, n_chunks,
                       gamma, gc, BLOCK: tl.constexpr, NC_BLOCK: tl.constexpr):
    """Carry in B from the later chunks' aggregates, rescan the chunk, write A and returns."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    ga = tl.load(ga_ptr + row)
    # incoming carry: compose chunks n_chunks−1 … chunk+1 (lane i ↔ chunk NC_BLOCK−1−i)
    j = NC_BLOCK - 1 - tl.arange(0, NC_BLOCK)
    later = (j > chunk) & (j < n_chunks)
    base = agg_ptr + (row.to(tl.int64) * n_chunks + j) * 4
    aca = tl.load(base + 0, mask=later, other=1.0)
    aba = tl.load(base + 1, mask=later, other=0.0)
    acc = tl.load(base + 2, mask=later, other=1.0)
    abc = tl.load(base + 3, mask=later, other=0.0)
    _, aba, _, abc = tl.associative_scan((aca, aba, acc, abc), 0, _compose)
    last = tl.arange(0, NC_BLOCK) == NC_BLOCK - 1
    carry_a = tl.sum(tl.where(last, aba, 0.0), 0)                      # B^λa after the chunk
    carry_c = tl.sum(tl.where(last, abc, 0.0), 0)
    _scan_chunk_and_write(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, row, chunk, T, gamma, ga, gc,
                          carry_a, carry_c, BLOCK)


@triton.jit
def _row_scan_kernel(r_ptr, v_ptr, m_ptr, ga_ptr, adv_ptr, ret_ptr, T, n_chunks, gamma, gc,
                     BLOCK: tl.constexpr):
    """One row: chunks last to first, each scanned in parallel, the carry passed between them."""
    row = tl.program_id(0)
    ga = tl.load(ga_ptr + row)
    carry_a = ga * 0.0                                                  # B after the row: 0
    carry_c = ga * 0.0
    last = tl.arange(0, BLOCK) == BLOCK - 1
    for k in range(n_chunks):
        chunk = n_chunks - 1 - k
        next_a, next_c = _scan_chunk_and_write(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, row, chunk, T,
                                               gamma, ga, gc, carry_a, carry_c, BLOCK)
        # lane BLOCK−1 holds B_{kC+1}: the carry after the previous chunk's last element
        carry_a = tl.sum(tl.where(last, next_a, 0.0), 0)
        carry_c = tl.sum(tl.where(last, next_c, 0.0), 0)


def pick_schedule(rows: int, device: torch.device) -> str:
    """"single" when the rows alone fill the GPU, else "two_pass" (see the module docstring)."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 1)
    return "single" if rows >= SINGLE_PASS_ROWS_PER_SM * sms else "two_pass"


def decoupled_gae_triton(rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float,
                         lam_actor: float, lam_critic: float,
                         length_adaptive_alpha: Optional[float] = None,
                         block_t: Optional[int] = None, schedule: str = "auto",
                         out: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """Launch the kernels of `schedule`; inputs already validated by gae.decoupled_gae. fp32 out."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: {schedule!r}, expected one of {SCHEDULES}")
    from vcppo_megatron.algorithms.gae import length_adaptive_lambda

    B, T = rewards.shape
    dev = rewards.device
    r, v = rewards.contiguous(), values.contiguous()
    m = response_mask.contiguous()
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    if length_adaptive_alpha is None:
        g_actor = torch.full((B,), gamma * lam_actor, dtype=torch.float32, device=dev)
    else:                                                               # VAPO eq. 5, per row
        lengths = (m != 0).sum(1)
        g_actor = (gamma * length_adaptive_lambda(lengths, float(length_adaptive_alpha))).float()
    block = block_t or min(BLOCK_T, max(16, triton.next_power_of_2(T)))
    n_chunks = triton.cdiv(T, block)
    adv, ret = out if out is not None else (torch.empty(B, T, dtype=torch.float32, device=dev)
                                            for _ in range(2))
    gc = gamma * lam_critic
    warps = 8 if block >= 2048 else 4
    if schedule == "auto":
        schedule = pick_schedule(B, dev)
    if schedule == "single":
        _row_scan_kernel[(B,)](r, v, m, g_actor, adv, ret, T, n_chunks, gamma, gc, BLOCK=block,
                               num_warps=warps)
        return adv, ret
    agg = torch.empty(B, n_chunks, 4, dtype=torch.float32, device=dev)
    grid = (B, n_chunks)
    _chunk_aggregate_kernel[grid](r, v, m, g_actor, agg, T, n_chunks, gamma, gc, BLOCK=block,
                                  num_warps=warps)
    _chunk_scan_kernel[grid](r, v, m, g_actor, agg, adv, ret, T, n_chunks, gamma, gc, BLOCK=block,
                             NC_BLOCK=max(2, triton.next_power_of_2(n_chunks)), num_warps=warps)
    return adv, ret
