"""Decoupled GAE (VC-PPO) with length-adaptive λ (VAPO): fused CPU path, Triton dispatch, references.

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
  * returns_t = A^{λ_critic}_t + V_t  (value target; for λ_critic = 1 it is the return-to-go)  (eq. 5)
  * advantages_t = A^{λ_actor}_t, or with `length_adaptive_alpha` = α a per-row
    λ_i = clip(1 − 1/(α·l_i), 0, 1), l_i = number of valid tokens of row i        (VAPO eq. 4-5)
  * Both outputs are 0 where mask = 0; rewards/values at masked positions are ignored (but must
    be finite). Outputs are float32; bf16/fp16 inputs are upcast and accumulated in float32.

Fast paths use the equivalent scalar recurrence (g = γλ; no cancellation for γ = λ = 1):
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

__all__ = ["decoupled_gae", "decoupled_gae_reference", "naive_gae_loop", "whiten_advantages",
           "length_adaptive_lambda"]

BACKENDS = ("auto", "cpu", "triton", "reference")
_CPU_CHUNK = 31            # time-chunk length C: the chunk matmul is [2C] -> [2C+2 = 64]
_CPU_BLOCK = 1 << 19       # elements per row block: keeps a block's working set in cache


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
            raise ValueError(f"{name}: expected a 2-D [batch, T] tensor, got shape {tuple(x.shape)}")
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


def decoupled_gae(rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float,
                  lam_actor: float, lam_critic: float, length_adaptive_alpha: Optional[float] = None,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Advantages (λ_actor or length-adaptive) and value targets (λ_critic) in one pass.

    See the module docstring for the exact semantics. Returns float32 (advantages, returns).
    backend: "auto" (Triton on CUDA when importable, else "cpu"), "cpu" (blocked-matmul scan,
    any device), "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "reference" (loop).
    """
    _validate(rewards, values, response_mask, gamma,
              {"lam_actor": lam_actor, "lam_critic": lam_critic}, length_adaptive_alpha, backend)
    if backend == "auto":
        backend = "triton" if rewards.is_cuda and _triton_available() else "cpu"
    if backend == "reference":
        adv, ret = decoupled_gae_reference(rewards, values, response_mask, gamma=gamma,
                                           lam_actor=lam_actor, lam_critic=lam_critic,
                                           length_adaptive_alpha=length_adaptive_alpha)
        return adv.float(), ret.float()
    B, T = rewards.shape
    if B == 0 or T == 0:
        z = torch.zeros(B, T, dtype=torch.float32, device=rewards.device)
        return z, z.clone()
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend: 'triton' requested but triton is not importable")
        if not rewards.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        _check_data(rewards, values, response_mask)
        from vcppo_megatron.algorithms.gae_triton import decoupled_gae_triton
        return decoupled_gae_triton(rewards, values, response_mask, gamma=float(gamma),
                                    lam_actor=float(lam_actor), lam_critic=float(lam_critic),
                                    length_adaptive_alpha=length_adaptive_alpha)
    return _gae_cpu(rewards, values, response_mask, float(gamma), float(lam_actor),
                    float(lam_critic), length_adaptive_alpha)


# ---------------------------------------------------------------- CPU fast path (blocked scan)
# Time is cut into chunks of C steps. With pre-masked rm = r·m and vm = V·m (prefix masks: rows with
# masked tokens inside are compacted first) one matmul per row block maps each chunk's [rm | vm]
# (2C numbers) to the chunk-local part of A_t (C), of returns_t (C) and, per λ, the chunk's B at
# its first step L_k (2). The carries S_k = L_k + g^C·S_{k+1} (float64) form a short second scan
# over chunks, and B_{n(t)} gets g^(C−1−j)·S_{k+1} added at local step j of chunk k.

def _chunk_weights(g_a: Tensor, g_c: Tensor, gamma: float, C: int) -> Tensor:
    """W [rows, 2C, 2C+2]: a chunk's [rm | vm] ↦ [local A | local returns | L_actor | L_critic]."""
    rows = max(len(g_a), len(g_c))
    W = torch.zeros(rows, 2 * C, 2 * C + 2, dtype=torch.float64, device=g_a.device)
    eye = torch.eye(C, dtype=torch.float64, device=g_a.device)
    jp = torch.arange(C, device=g_a.device)
    expo = jp[:, None] - jp[None, :] - 1                              # j' − j − 1
    for g, cols, lcol, sub_v in ((g_a, slice(0, C), 2 * C, 1.0), (g_c, slice(C, 2 * C), 2 * C + 1, 0.0)):
        p = torch.pow(g[:, None], torch.arange(C + 1, dtype=torch.float64, device=g.device))
        mex = torch.where(expo >= 0, p[:, expo.clamp_min(0)], 0.0)    # g^(j'−j−1), j' > j
        gv = g[:, None, None]
        W[:, :C, cols] = gv * mex + eye                               # b = g·r + (γ−g)·V, + r_t
        W[:, C:, cols] = (gamma - gv) * mex - sub_v * eye             # − V_t in A only
        W[:, :C, lcol] = g[:, None] * p[:, :C]                        # L = Σ_j g^j b_j
        W[:, C:, lcol] = (gamma - g[:, None]) * p[:, :C]
    return W.float()


def _suffix_carries(L: Tensor, G: Tensor) -> Tensor:
    """S[:, k] = Σ_{j>k} G^(j−k−1)·L[:, j] for L [n, K] and G [n] or [1] (float64): the carry
    scan, itself blocked (32 per block, one small matmul) and recursive over the block sums."""
    n, K = L.shape
    c = min(K, 32)
    nb = -(-K // c)
    Lp = torch.zeros(n, nb * c, dtype=L.dtype)
    Lp[:, :K] = L
    Lp = Lp.view(n, nb, c)
    p = torch.pow(G[:, None], torch.arange(c + 1, dtype=L.dtype))     # G^0 … G^c per row
    j = torch.arange(c)
    expo = j[:, None] - j[None, :] - 1
    mex = torch.where(expo >= 0, p[:, expo.clamp_min(0)], 0.0)        # [n or 1, c, c]
    out = torch.bmm(Lp, mex) if len(G) > 1 else Lp @ mex[0]           # within-block part
    if nb > 1:
        incl = Lp @ p[0, :c] if len(G) == 1 else (Lp * p[:, None, :c]).sum(-1)  # block sums
        out += _suffix_carries(incl, p[:, c])[:, :, None] * p[:, None, c - 1 - j]
    return out.view(n, nb * c)[:, :K]


def _compact(r: Tensor, v: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Move each row's valid tokens to the front (order kept): the mask becomes a prefix."""
    n, T = m.shape
    pos = torch.cumsum(m, 1, dtype=torch.int64) - 1                   # rank among valid tokens
    dest = torch.where(m > 0, pos, torch.full_like(pos, T))           # masked → dump column T
    rc = torch.zeros(n, T + 1, dtype=r.dtype).scatter_(1, dest, r)[:, :T]
    vc = torch.zeros(n, T + 1, dtype=v.dtype).scatter_(1, dest, v)[:, :T]
    mc = (torch.arange(T)[None, :] < pos[:, -1:] + 1).to(m.dtype)
    return rc, vc, mc, pos.clamp_min(0)


def _mask_is_binary(m: Tensor) -> bool:
    """Float mask has only 0/1: within [0, 1] and Σ m·(1 − m) = 0 (non-negative terms, exact)."""
    lo, hi = torch.aminmax(m)
    return bool(lo >= 0) and bool(hi <= 1) and float(torch.dot(m.flatten(), (1 - m).flatten())) == 0


def _mask_stats(m: Tensor, C: int) -> tuple[bool, Tensor]:
    """(some row is not a prefix of ones, row lengths) of a 0/1 float mask: per-chunk counts
    must read C, …, C, p, 0, …, 0 and the partial chunk must start with its p ones."""
    n, T = m.shape
    F = T // C * C
    cnt = m[:, :F].view(n, -1, C).sum(-1) if F else m.new_zeros(n, 0)
    if T > F:
        cnt = torch.cat([cnt, m[:, F:].sum(1, keepdim=True)], 1)
    K = cnt.shape[1]
    size = torch.full((K,), float(C))
    size[-1] = T - F if T > F else C
    k = (cnt == size).to(torch.int64).cumprod(1).sum(1)               # leading full chunks
    after = (torch.arange(K)[None, :] > k[:, None]) & (cnt > 0)       # ones after the partial one
    idx = (k[:, None] * C + torch.arange(C)[None, :]).clamp_max(T - 1)
    part = cnt.gather(1, k.clamp_max(K - 1)[:, None])                 # ones in the partial chunk
    gap = (torch.arange(C)[None, :] < part) & (m.gather(1, idx) != 1) & (k[:, None] < K)
    return bool(after.any() | gap.any()), cnt.sum(1)


def _as_f32(x: Tensor, buf: Tensor) -> Tensor:
    """x as float32: itself if already float32 and contiguous, else converted into buf."""
    return x if x.dtype == torch.float32 and x.is_contiguous() else buf.copy_(x)


def _gae_cpu(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam_actor: float,
             lam_critic: float, alpha: Optional[float]) -> tuple[Tensor, Tensor]:
    """Blocked scan over row blocks: one chunk matmul, a float64 carry scan, one output pass."""
    B, T = rewards.shape
    C = _CPU_CHUNK
    nC, F = -(-T // C), T // C * C
    rows = max(1, min(B, _CPU_BLOCK // (nC * C)))
    adv = torch.empty(B, T, dtype=torch.float32)
    ret = torch.empty(B, T, dtype=torch.float32)
    f64 = dict(dtype=torch.float64)
    g_c = torch.tensor([gamma * lam_critic], **f64)
    g_a = torch.tensor([gamma * lam_actor], **f64)
    W = _chunk_weights(g_a, g_c, gamma, C)[0] if alpha is None else None
    X = torch.zeros(rows, nC, 2, C, dtype=torch.float32)             # [rm | vm] per chunk, 0 tail
    Y = torch.empty(rows * nC, 2 * C + 2, dtype=torch.float32)
    bufs = [torch.empty(rows, T, dtype=torch.float32) for _ in range(5)]
    jd = torch.arange(C - 1, -1, -1, dtype=torch.float64)            # C−1−j
    for r0 in range(0, B, rows):
        r1 = min(B, r0 + rows)
        n = r1 - r0
        r, v, m = (_as_f32(x[r0:r1], b[:n]) for x, b in zip((rewards, values, mask), bufs))
        m0 = m
        if mask.dtype != torch.bool and not _mask_is_binary(m):
            raise ValueError("response_mask: expected only 0 and 1 values")
        holes, lengths = _mask_stats(m, C)
        if holes:                                                      # masked tokens mid-row
            _check_data(r, v, m)                                       # (compaction drops them)
            r, v, m, pos = _compact(r, v, m)
        Xn = X[:n]
        for k, x in enumerate((r, v)):                                 # rm = r·m, vm = V·m
            if F:
                torch.mul(x[:, :F].view(n, -1, C), m[:, :F].view(n, -1, C), out=Xn[:, : F // C, k])
            if T > F:
                torch.mul(x[:, F:], m[:, F:], out=Xn[:, -1, k, : T - F])
        Yn = Y[: n * nC]
        if alpha is None:
            torch.mm(Xn.view(n * nC, 2 * C), W, out=Yn)
            d = torch.stack([g_a, g_c]) ** jd                          # [2, C] carry decays
        else:                                                          # VAPO eq. 5, per row
            g_rows = gamma * length_adaptive_lambda(lengths, alpha)
            Wn = _chunk_weights(g_rows, g_c.expand(n), gamma, C)
            torch.bmm(Xn.view(n, nC, 2 * C), Wn, out=Yn.view(n, nC, 2 * C + 2))
            d = torch.stack([g_rows[:, None] ** jd, (g_c ** jd).expand(n, C)])   # [2, n, C]
        Yv = Yn.view(n, nC, 2 * C + 2)
        L = Yv[:, :, 2 * C:].double()                                  # [n, nC, actor/critic]
        g_act = g_rows if alpha is not None else g_a
        carry_a = _suffix_carries(L[:, :, 0], g_act ** C)              # S_{k+1} per chunk k
        carry_c = _suffix_carries(L[:, :, 1], g_c ** C)
        outs = (adv[r0:r1], ret[r0:r1]) if not holes else (bufs[3][:n], bufs[4][:n])
        for i, (out, carry) in enumerate(zip(outs, (carry_a, carry_c))):
            di = d[i] if alpha is None else d[i][:, None, :]
            if F:                                                      # B_{n(t)} += g^(C−1−j)·S_{k+1}
                torch.addcmul(Yv[:, : F // C, i * C:(i + 1) * C], carry[:, : F // C, None].float(),
                              di.float(), out=out[:, :F].view(n, -1, C))
            if T > F:                                                  # last chunk: no carry in
                out[:, F:] = Yv[:, -1, i * C: i * C + T - F]
        if holes:
            torch.gather(outs[0], 1, pos, out=adv[r0:r1]).mul_(m0)
            torch.gather(outs[1], 1, pos, out=ret[r0:r1]).mul_(m0)
        elif not torch.isfinite(adv[r0:r1].sum()):                     # NaN/inf in r or V shows
            _check_data(r, v, m)                                       # here (else: overflow)
    return adv, ret


# ------------------------------------------------------------------- references and baseline

def decoupled_gae_reference(rewards: Tensor, values: Tensor, response_mask: Tensor, *,
                            gamma: float, lam_actor: float, lam_critic: float,
                            length_adaptive_alpha: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Float64 per-time-step loop of the module-docstring definition (tests and benchmarks)."""
    _validate(rewards, values, response_mask, gamma,
              {"lam_actor": lam_actor, "lam_critic": lam_critic}, length_adaptive_alpha, "reference")
    _check_data(rewards, values, response_mask)
    r = rewards.detach().double().cpu().numpy()
    v = values.detach().double().cpu().numpy()
    m = response_mask.detach().cpu().numpy().astype(bool)
    B, T = r.shape
    if length_adaptive_alpha is None:
        lam_a = np.full(B, float(lam_actor))
    else:
        lam_a = length_adaptive_lambda(torch.from_numpy(m.sum(1)), float(length_adaptive_alpha)).numpy()
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    nextvalues = np.zeros(B)
    gae_a, gae_c = np.zeros(B), np.zeros(B)
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
    """The peers' way: one λ, a masked per-time-step torch loop over columns (benchmark baseline)."""
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

def whiten_advantages(advantages: Tensor, mask: Tensor, *, group: Optional[dist.ProcessGroup] = None,
                      eps: float = 1e-8, shift_mean: bool = True) -> Tensor:
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
    n_safe = n.clamp_min(1.0)
    mean = s / n_safe
    var = (ss / n_safe - mean * mean).clamp_min(0.0)
    var = var * torch.where(n > 1, n / (n - 1).clamp_min(1.0), torch.ones_like(n))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return (out * m).to(advantages.dtype)
