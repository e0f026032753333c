"""Decoupled GAE (VC-PPO) with length-adaptive λ (VAPO): CPU fast path, Triton dispatch, reference.

Papers: VC-PPO (arXiv 2503.01491) eq. 3 (GAE), eq. 4 (γ = 1 form), eq. 5 (value target) and §3.3
(decoupled λ: λ_critic for the value targets, λ_actor for the policy); VAPO (arXiv 2504.05118)
eq. 4-5 (length-adaptive λ_policy = 1 − 1/(α·l)).

Semantics (row i of [batch, T] right-padded response tensors; `response_mask` 1 on tokens that
count, 0 on padding and on masked tokens inside a response, e.g. tool output in multi-turn data):
  * Only valid (mask = 1) positions take part. For a valid t let n(t) be the next valid position
    after t (none if t is the row's last valid token); masked positions are skipped, not counted.
  * nextvalues_t = V_{n(t)}, or 0 when n(t) does not exist (V = 0 after the last valid token).
  * delta_t = r_t + γ·nextvalues_t − V_t                                    (VC-PPO eq. 3)
  * A^λ_t = delta_t + γλ·A^λ_{n(t)}, A^λ = 0 past the end, i.e.
    A^λ_t = Σ_k (γλ)^k delta_{n^k(t)} over the chain of valid positions   (VC-PPO eq. 3-4)
  * returns_t = A^{λ_critic}_t + V_t: value target; the return-to-go for λ_critic = 1   (eq. 5)
  * advantages_t = A^{λ_actor}_t, or with `length_adaptive_alpha` = α a per-row
    λ_i = clip(1 − 1/(α·l_i), 0, 1), l_i = number of valid tokens of row i        (VAPO eq. 4-5)
  * Both outputs are 0 where mask = 0; rewards/values at masked positions are ignored (but must
    be finite). Outputs are float32; bf16/fp16 inputs are upcast and accumulated in float32.

Backends: "cpu" (gae_numba.py) runs this recurrence literally, one compiled pass per row with both
λ carries in float64, rows in parallel. "triton" (gae_triton.py) scans along time in parallel with
the equivalent scalar recurrence (g = γλ; no cancellation for γ = λ = 1):
  B_t = b_t + g·B_{n(t)},  b_t = g·r_t + (γ − g)·V_t,  A_t = r_t − V_t + B_{n(t)},
which follows from B_t := γ·V_t + g·A_t.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from vcppo_megatron.algorithms.gae_numba import decoupled_gae_cpu

__all__ = ["decoupled_gae", "decoupled_gae_reference", "naive_gae_loop", "whiten_advantages",
           "length_adaptive_lambda"]

BACKENDS = ("auto", "cpu", "triton", "reference")


def _triton_available() -> bool:
    """Whether triton can be imported (without importing it)."""
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def length_adaptive_lambda(lengths: Tensor, alpha: float) -> Tensor:
    """Per-row λ_i = clip(1 − 1/(α·l_i), 0, 1) in float64 (VAPO eq. 5)."""
    l = lengths.to(torch.float64).clamp_min(1.0)
    return (1.0 - 1.0 / (alpha * l)).clamp(0.0, 1.0)


def _validate(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lams: dict,
              alpha: Optional[float], backend: str) -> None:
    """Check shapes, dtypes, devices and hyper-parameters (no data access)."""
    for name, x in (("rewards", rewards), ("values", values), ("response_mask", mask)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D [batch, T] tensor, got {tuple(x.shape)}")
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError("rewards, values, response_mask: expected equal shapes, got "
                         f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")
    for name, x in (("rewards", rewards), ("values", values)):
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(f"response_mask: expected dtype bool or floating point (pass bool or "
                         f"float), got {mask.dtype}")
    if not (rewards.device == values.device == mask.device):
        raise ValueError("rewards, values, response_mask: expected the same device, got "
                         f"{rewards.device}, {values.device}, {mask.device}")
    for name, v in (("gamma", gamma), *lams.items()):
        if not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
            raise ValueError(f"{name}: expected a number in [0, 1], got {v!r}")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not float(alpha) > 0.0):
        raise ValueError(f"length_adaptive_alpha: expected a number > 0 or None, got {alpha!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _check_data(rewards: Tensor, values: Tensor, mask: Tensor) -> None:
    """Raise if rewards/values hold NaN/inf or a float mask holds values other than 0 and 1."""
    checks = [~torch.isfinite(rewards).all(), ~torch.isfinite(values).all()]
    if mask.dtype != torch.bool:
        checks.append(((mask != 0) & (mask != 1)).any())
    bad = torch.stack(checks).tolist()            # one host sync for all checks
    if bad[0]:
        raise ValueError("rewards: expected finite values, found NaN or inf")
    if bad[1]:
        raise ValueError("values: expected finite values, found NaN or inf")
    if len(bad) > 2 and bad[2]:
        raise ValueError("response_mask: expected only 0 and 1 values")


def _check_out(out: tuple, rewards: Tensor) -> None:
    """out must be two contiguous float32 [batch, T] tensors on the inputs' device."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(
            isinstance(o, Tensor) and o.shape == rewards.shape and o.dtype == torch.float32
            and o.device == rewards.device and o.is_contiguous() for o in out)):
        raise ValueError(f"out: expected two contiguous float32 tensors of shape "
                         f"{tuple(rewards.shape)} on {rewards.device}")


def decoupled_gae(rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float,
                  lam_actor: float, lam_critic: float,
                  length_adaptive_alpha: Optional[float] = None, backend: str = "auto",
                  out: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """Advantages (λ_actor or length-adaptive) and value targets (λ_critic) in one pass.

    See the module docstring for the exact semantics. Returns float32 (advantages, returns).
    backend: "auto" (Triton on CUDA when importable, else "cpu"), "cpu" (compiled row scan on
    the CPU; other devices' tensors are copied there and back), "triton" (CUDA, or CPU tensors
    under TRITON_INTERPRET=1), "reference" (the float64 loop).
    out: optional (advantages, returns) buffers to write and return, e.g. reused every step.
    """
    _validate(rewards, values, response_mask, gamma,
              {"lam_actor": lam_actor, "lam_critic": lam_critic}, length_adaptive_alpha, backend)
    if out is not None:
        _check_out(out, rewards)
    rewards, values, response_mask = rewards.detach(), values.detach(), response_mask.detach()
    if backend == "auto":
        backend = "triton" if rewards.is_cuda and _triton_available() else "cpu"
    B, T = rewards.shape
    kw = dict(gamma=float(gamma), lam_actor=float(lam_actor), lam_critic=float(lam_critic),
              length_adaptive_alpha=length_adaptive_alpha)
    if backend == "reference":
        adv, ret = (x.float() for x in decoupled_gae_reference(rewards, values, response_mask,
                                                               **kw))
    elif B == 0 or T == 0:
        adv, ret = (torch.zeros(B, T, device=rewards.device) for _ in range(2))
    elif backend == "triton":
        if not _triton_available():
            raise ValueError("backend: 'triton' requested but triton is not importable")
        if not rewards.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        _check_data(rewards, values, response_mask)
        from vcppo_megatron.algorithms.gae_triton import decoupled_gae_triton
        adv, ret = decoupled_gae_triton(rewards, values, response_mask, out=out, **kw)
    elif rewards.device.type == "cpu":
        adv, ret = decoupled_gae_cpu(rewards, values, response_mask, out=out, **kw)
    else:                                                              # "cpu" on another device
        adv, ret = decoupled_gae_cpu(rewards.cpu(), values.cpu(), response_mask.cpu(), **kw)
        adv, ret = adv.to(rewards.device), ret.to(rewards.device)
    if out is not None and adv is not out[0]:
        out[0].copy_(adv)
        out[1].copy_(ret)
        return out[0], out[1]
    return adv, ret


# ------------------------------------------------------------------- references and baseline

def decoupled_gae_reference(rewards: Tensor, values: Tensor, response_mask: Tensor, *,
                            gamma: float, lam_actor: float, lam_critic: float,
                            length_adaptive_alpha: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Float64 per-time-step loop of the module-docstring definition (tests and benchmarks)."""
    _validate(rewards, values, response_mask, gamma,
              {"lam_actor": lam_actor, "lam_critic": lam_critic}, length_adaptive_alpha, "cpu")
    _check_data(rewards, values, response_mask)
    r = rewards.detach().double().cpu().numpy()
    v = values.detach().double().cpu().numpy()
    m = response_mask.detach().cpu().numpy().astype(bool)
    B, T = r.shape
    if length_adaptive_alpha is None:
        lam_a = np.full(B, float(lam_actor))
    else:
        lengths = torch.from_numpy(m.sum(1))
        lam_a = length_adaptive_lambda(lengths, float(length_adaptive_alpha)).numpy()
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    nextvalues, gae_a, gae_c = np.zeros(B), np.zeros(B), np.zeros(B)
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * nextvalues - v[:, t]                 # VC-PPO eq. 3
        gae_a = np.where(mt, delta + gamma * lam_a * gae_a, gae_a)      # masked: carry forward
        gae_c = np.where(mt, delta + gamma * lam_critic * gae_c, gae_c)
        nextvalues = np.where(mt, v[:, t], nextvalues)
        adv[:, t] = np.where(mt, gae_a, 0.0)
        ret[:, t] = np.where(mt, gae_c + v[:, t], 0.0)                  # VC-PPO eq. 5
    return torch.from_numpy(adv), torch.from_numpy(ret)


def naive_gae_loop(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
                   lam: float) -> tuple[Tensor, Tensor]:
    """The peers' way: one λ, a masked per-time-step torch loop over columns (the baseline)."""
    B, T = rewards.shape
    mask = mask.to(values.dtype)
    nextvalues = torch.zeros(B, dtype=values.dtype, device=values.device)
    lastgaelam = torch.zeros_like(nextvalues)
    out = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * mask[:, t] + (1 - mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * mask[:, t] + (1 - mask[:, t]) * lastgaelam
        out.append(lastgaelam)
    advantages = torch.stack(out[::-1], dim=1)
    returns = advantages + values
    return advantages * mask, returns * mask


# ------------------------------------------------------------------------------- whitening

def whiten_advantages(advantages: Tensor, mask: Tensor, *,
                      group: Optional[dist.ProcessGroup] = None, eps: float = 1e-8,
                      shift_mean: bool = True) -> Tensor:
    """Masked whitening (x − mean)/sqrt(var + eps) with statistics over `group` (None: local).

    Sum, sum of squares and count over mask = 1 are all-reduced in float64 over the explicit
    `group`, so every rank gets the statistics of the concatenated batch. var is unbiased
    (n/(n−1), as in verl's masked_whiten; n ≤ 1 uses 1). shift_mean=False adds the mean back.
    Masked positions are 0 in the output, which has the input's dtype.
    """
    if advantages.shape != mask.shape:
        raise ValueError(f"mask: expected shape {tuple(advantages.shape)}, got {tuple(mask.shape)}")
    x = advantages.double()
    m = mask.to(torch.float64)
    xm = x * m
    stats = torch.stack([xm.sum(), (xm * x).sum(), m.sum()])
    if group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    s, ss, n = stats.unbind()
    mean = s / n.clamp_min(1.0)
    var = (ss / n.clamp_min(1.0) - mean * mean).clamp_min(0.0)             # population variance
    var = var * torch.where(n > 1, n / (n - 1).clamp_min(1.0), 1.0)        # Bessel correction
    out = (x - mean) * torch.rsqrt(var + eps) + (0.0 if shift_mean else mean)
    return (out * m).to(advantages.dtype)
