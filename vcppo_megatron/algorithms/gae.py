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

Fast paths use the equivalent scalar recurrence (g = γλ; no cancellation for γ = λ = 1):
  B_t = b_t + g·B_{n(t)},  b_t = g·r_t + (γ − g)·V_t,  A_t = r_t − V_t + B_{n(t)},
which follows from B_t := γ·V_t + g·A_t.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["decoupled_gae", "decoupled_gae_reference", "naive_gae_loop", "whiten_advantages",
           "length_adaptive_lambda"]

BACKENDS = ("auto", "cpu", "triton", "reference")
_CPU_CHUNK = 16            # time-chunk length C of the blocked matmul scan
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
    backend: "auto" (Triton on CUDA when importable, else "cpu"), "cpu" (blocked-matmul scan on
    the CPU; other devices' tensors are copied there and back), "triton" (CUDA, or CPU tensors
    under TRITON_INTERPRET=1), "reference" (the float64 loop).
    out: optional (advantages, returns) buffers to write and return, e.g. reused every step (on a
    CPU, first-touching fresh 32 MiB outputs can cost as much as the computation itself).
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
        adv, ret = _gae_cpu(rewards, values, response_mask, out=out, **kw)
    else:                                                              # "cpu" on another device
        adv, ret = _gae_cpu(rewards.cpu(), values.cpu(), response_mask.cpu(), **kw)
        adv, ret = adv.to(rewards.device), ret.to(rewards.device)
    if out is not None and adv is not out[0]:
        out[0].copy_(adv)
        out[1].copy_(ret)
        return out[0], out[1]
    return adv, ret


# ---------------------------------------------------------------- CPU fast path (blocked scan)
# Time is cut into chunks of C steps (rows with masked tokens inside are compacted first, so the
# mask is a prefix). Per row block, chunk-local A and returns are matmuls of the pre-masked
# rm = m·r and vm = m·V with C×C matrices (_chunk_weights). The chunk's B at its first step,
# L_k = γ·V + g·A there (as B_t = γ·V_t + g·A_t), feeds the carries S_k = L_k + g^C·S_{k+1}, a
# short float64 scan over chunks; local step j of chunk k then gets g^(C−1−j)·S_{k+1} added.

def _chunk_weights(g: Tensor, gamma: float, C: int, minus_v: bool) -> tuple[Tensor, Any]:
    """(Wr, Wv) [rows, C, C] float32 with local B_{n(t)} + m·(r − V or r) = rm @ Wr + vm @ Wv.

    B_{n(t)} within a chunk is Σ_{j'>j} g^(j'−j−1)·b_{j'}, b = g·rm + (γ−g)·vm: with
    Mex[j', j] = g^(j'−j−1) (j' > j), Wr = I + g·Mex and Wv = (γ−g)·Mex (− I for A; None if 0).
    """
    j = torch.arange(C)
    expo = j[:, None] - j[None, :] - 1
    p = g[:, None] ** torch.arange(C, dtype=torch.float64)
    mex = torch.where(expo >= 0, p[:, expo.clamp_min(0)], 0.0)        # [rows, C, C]
    eye = torch.eye(C, dtype=torch.float64)
    wv = (gamma - g)[:, None, None] * mex - (eye if minus_v else 0.0)
    wr = (eye + g[:, None, None] * mex).float()
    return wr, (wv.float() if bool(wv.ne(0).any()) else None)


def _carry_plan(G: Tensor, K: int) -> list[tuple]:
    """Operators of the carry scan over K chunks for decays G [2, n or 1] (float64), per level:
    blocks of 16 (then 64) chunks, one small matmul, then recursively over the block sums."""
    plan = []
    while True:
        c = min(K, 16 if not plan else 64)
        nb = -(-K // c)
        p = G[..., None] ** torch.arange(c + 1, dtype=torch.float64)  # G^0 … G^c  [2, n, c+1]
        j = torch.arange(c + 1)
        expo = j[:c, None] - j[None, :] - 1                           # column c: block sum
        mex = torch.where(expo >= 0, p[..., expo.clamp_min(0)], 0.0)  # G^(j'−j−1) for j' > j
        mex[..., c] = p[..., :c]                                       # Σ_j G^j L_j
        plan.append((K, c, nb, mex.flatten(0, 1), p[..., None, c - 1 - j[:c]]))
        if nb == 1:
            return plan
        G, K = p[..., c], nb


def _suffix_carries(L: Tensor, plan: list[tuple], level: int = 0) -> Tensor:
    """S[.., k] = Σ_{j>k} G^(j−k−1)·L[.., j] for L [2, n, K] (float64): the incoming carries."""
    K, c, nb, mex, decay = plan[level]
    q, n = L.shape[:2]
    Lp = torch.nn.functional.pad(L, (0, nb * c - K)) if nb * c > K else L
    Lb = Lp.reshape(q, n * nb, c) if mex.shape[0] == q else Lp.reshape(q * n, nb, c)
    out = torch.bmm(Lb, mex).view(q, n, nb, c + 1)                    # within a block, block sum
    local = out[..., :c]
    if nb > 1:                                                         # + carried across blocks
        local += _suffix_carries(out[..., c], plan, level + 1)[..., None] * decay
    return local.reshape(q, n, nb * c)[..., :K]


def _mask_stats(m: Tensor, C: int) -> tuple[Tensor, Tensor]:
    """(row is not a prefix of ones, row length) of a 0/1 float mask [B, T]: per-chunk counts
    must read C, …, C, p, 0, …, 0 and the partial chunk must start with its p ones."""
    B, T = m.shape
    F = T // C * C
    cnt = m[:, :F].reshape(B, -1, C).sum(-1).double()                 # exact: small integers
    if T > F:
        cnt = torch.cat([cnt, m[:, F:].sum(1, keepdim=True).double()], 1)
    K = cnt.shape[1]
    size = torch.full((K,), float(C), dtype=torch.float64)
    size[-1] = T - F if T > F else C
    notfull = (cnt != size).to(torch.int32)
    k = torch.where(notfull.any(1), notfull.argmax(1), K)             # leading full chunks
    later = ((torch.arange(K)[None, :] > k[:, None]) & (cnt > 0)).any(1)   # ones after partial
    idx = (k[:, None] * C + torch.arange(C)[None, :]).clamp_max(T - 1)
    part = cnt.gather(1, k.clamp_max(K - 1)[:, None])                 # ones in the partial chunk
    gap = ((torch.arange(C)[None, :] < part) & (m.gather(1, idx) != 1) & (k[:, None] < K)).any(1)
    return later | gap, cnt.sum(1)


def _as_f32(x: Tensor, buf: Tensor) -> Tensor:
    """x as float32: itself if already float32 and contiguous, else converted into buf."""
    if x.dtype == torch.bool:                                          # (much faster via uint8)
        return buf.copy_(x.view(torch.uint8))
    return x if x.dtype == torch.float32 and x.is_contiguous() else buf.copy_(x)


def _compact(r: Tensor, v: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Move each row's valid tokens to the front (order kept): the mask becomes a prefix."""
    n, T = m.shape
    pos = torch.cumsum(m, 1, dtype=torch.int64) - 1                   # rank among valid tokens
    dest = torch.where(m > 0, pos, torch.full_like(pos, T))           # masked → dump column T
    rc = torch.zeros(n, T + 1).scatter_(1, dest, r)[:, :T]
    vc = torch.zeros(n, T + 1).scatter_(1, dest, v)[:, :T]
    mc = (torch.arange(T)[None, :] < pos[:, -1:] + 1).float()
    return rc, vc, mc, pos.clamp_min(0)


def _gae_cpu(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam_actor: float,
             lam_critic: float, length_adaptive_alpha: Optional[float],
             out: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """Blocked scan over row blocks: two chunk matmuls, a float64 carry scan, in-place carry-in."""
    B, T = rewards.shape
    alpha = length_adaptive_alpha
    C = _CPU_CHUNK
    nC = -(-T // C)
    Tp = nC * C
    rows = max(1, min(B, _CPU_BLOCK // Tp))
    ga, gc = gamma * lam_actor, gamma * lam_critic                     # g = γλ (actor if constant)
    gvec = torch.tensor([[ga], [gc]], dtype=torch.float64)            # [2, 1]
    w_a = _chunk_weights(gvec[0], gamma, C, minus_v=True)
    w_c = _chunk_weights(gvec[1], gamma, C, minus_v=False)
    plan = _carry_plan(gvec ** C, nC)
    coef = torch.tensor([[ga, 0.0, gamma], [0.0, gc, gamma - gc]], dtype=torch.float64)
    jd = torch.arange(C - 1, -1, -1, dtype=torch.float64)             # C−1−j
    decay = (gvec[..., None] ** jd).float()                           # [2, 1, C]
    adv, ret = out if out is not None else (torch.empty(B, T) for _ in range(2))
    inb = [torch.empty(rows, T) for _ in range(4)]                    # conversions, scratch
    pad = [torch.zeros(rows, Tp) for _ in range(2)] + [torch.empty(rows, Tp) for _ in range(2)]
    mask_checks, finite_checks = [], []
    for r0 in range(0, B, rows):
        r1 = min(B, r0 + rows)
        n = r1 - r0
        r, v, m = (_as_f32(x[r0:r1], b[:n]) for x, b in zip((rewards, values, mask), inb))
        holes, lengths = _mask_stats(m, 128)
        block_holes = bool(holes.any())
        if alpha is not None:                                          # VAPO eq. 5, per row
            g = torch.stack([gamma * length_adaptive_lambda(lengths, alpha),
                             gvec[1].expand(n)])[..., None]           # [2, n, 1]
            w_a = _chunk_weights(g[0, :, 0], gamma, C, minus_v=True)
            plan = _carry_plan(g[..., 0] ** C, nC)
            decay = (g ** jd).float()                                  # [2, n, C]
        else:
            g = gvec[..., None]
        if block_holes:                                                # masked tokens mid-row
            _check_data(r, v, m)                                       # (compaction drops them)
            m0 = m
            r, v, m, pos = _compact(r, v, m)
        rm, vm = pad[0][:n], pad[1][:n]
        torch.mul(r, m, out=rm[:, :T])                                 # zero tail up to Tp
        torch.mul(v, m, out=vm[:, :T])
        if mask.is_floating_point() and not block_holes:               # 0/1 check, exact: [0, 1]
            one_minus = torch.sub(1.0, m, out=inb[3][:n])              # and Σ m·(1−m) = 0
            mask_checks += [*torch.aminmax(m), torch.dot(m.flatten(), one_minus.flatten())]
        direct = Tp == T and not block_holes                           # write into the outputs
        out_a, out_r = (adv[r0:r1], ret[r0:r1]) if direct else (pad[2][:n], pad[3][:n])
        for dst, (wr, wv) in ((out_a, w_a), (out_r, w_c)):            # A = r − V + B_{n(t)},
            if wr.shape[0] == 1:                                       # returns = r + B^c_{n(t)}
                torch.mm(rm.view(n * nC, C), wr[0], out=dst.view(n * nC, C))
                if wv is not None:
                    dst.view(n * nC, C).addmm_(vm.view(n * nC, C), wv[0])
            else:
                torch.bmm(rm.view(n, nC, C), wr, out=dst.view(n, nC, C))
                dst.view(n, nC, C).baddbmm_(vm.view(n, nC, C), wv)
        # B at each chunk start: L = γ·V + g·A (actor), γ·V + g·(returns − V) (critic)
        starts = torch.stack([out_a[:, ::C], out_r[:, ::C], vm[:, ::C]]).double()  # [3, n, nC]
        if alpha is None:
            L = torch.mm(coef, starts.view(3, -1)).view(2, n, nC)
        else:
            a0, ret0, vm0 = starts.unbind()
            L = torch.stack([g[0] * a0 + gamma * vm0, g[1] * ret0 + (gamma - g[1]) * vm0])
        carries = _suffix_carries(L, plan).float()                     # S_{k+1} for chunk k
        for i, dst in enumerate((out_a, out_r)):                       # += g^(C−1−j)·S_{k+1}
            dst.view(n, nC, C).addcmul_(carries[i, :, :, None], decay[i, :, None, :])
        if block_holes:
            torch.gather(out_a, 1, pos, out=adv[r0:r1]).mul_(m0)
            torch.gather(out_r, 1, pos, out=ret[r0:r1]).mul_(m0)
        elif not direct:
            adv[r0:r1] = out_a[:, :T]
            ret[r0:r1] = out_r[:, :T]
        if not block_holes:
            finite_checks.append(adv[r0:r1].sum())                     # NaN/inf in r or V show here
    if mask_checks:
        lo, hi, dots = torch.stack(mask_checks).view(-1, 3).unbind(1)
        if bool((lo < 0).any() | (hi > 1).any() | (dots != 0).any()):
            raise ValueError("response_mask: expected only 0 and 1 values")
    if finite_checks and not bool(torch.isfinite(torch.stack(finite_checks)).all()):
        _check_data(rewards, values, mask)                             # (else: finite overflow)
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
