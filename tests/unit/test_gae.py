"""decoupled_gae (VC-PPO eq. 3-5, VAPO eq. 4-5): every backend against the float64 reference loop,
closed forms, input validation, and masked whitening.

Error measure: rel_err(x, ref) = max|x − ref| / max(1, max|ref|) over the whole [batch, T] output,
ref in float64; tolerance 1e-5. The Triton kernel is checked under TRITON_INTERPRET=1 (numpy on
CPU) in one subprocess, since the variable must be set before triton is imported, and compiled
for the H100 (sm_90a) with triton's own ptxas, which needs no GPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from vcppo_megatron.algorithms.gae import (decoupled_gae, decoupled_gae_reference, naive_gae_loop,
                                           whiten_advantages)

TOL = 1e-5
HAS_TRITON = importlib.util.find_spec("triton") is not None


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max|x − ref| / max(1, max|ref|), in float64."""
    ref = ref.double()
    return float((x.double() - ref).abs().max() / max(1.0, float(ref.abs().max())))


def make_batch(B: int, T: int, *, seed: int, holes: bool = False, empty_rows: tuple = (),
               len1_rows: tuple = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch: terminal ±1 reward plus a small per-token penalty, random values."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T                                                     # one full-length row
    for i in empty_rows:
        lengths[i] = 0
    for i in len1_rows:
        lengths[i] = 1
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if holes:                                                          # masked tool-output spans
        mask &= torch.rand(B, T, generator=g) > 0.25
    rewards = -1e-3 * torch.rand(B, T, generator=g)
    last = (lengths - 1).clamp_min(0)
    rewards[torch.arange(B), last] += torch.randint(0, 2, (B,), generator=g).float() * 2 - 1
    values = torch.randn(B, T, generator=g)
    return rewards, values, mask


def check_backend(backend: str, rewards, values, mask, **kw) -> tuple[float, float]:
    adv, ret = decoupled_gae(rewards, values, mask, backend=backend, **kw)
    ref_adv, ref_ret = decoupled_gae_reference(rewards, values, mask, **kw)
    assert adv.dtype == ret.dtype == torch.float32
    assert adv.shape == ret.shape == rewards.shape
    return rel_err(adv, ref_adv), rel_err(ret, ref_ret)


# (B, T, holes, gamma, lam_actor, lam_critic, alpha)
CPU_CASES = [
    (4, 32768, False, 1.0, 0.95, 1.0, None),
    (4, 32768, True, 0.99, 0.95, 1.0, 0.05),
    (4, 32768, False, 1.0, 1.0, 1.0, None),
    (7, 1001, False, 1.0, 0.0, 1.0, None),
    (7, 1001, True, 0.99, 0.95, 0.9, None),
    (7, 1001, True, 1.0, 1.0, 0.95, 0.05),
    (130, 97, True, 0.99, 1.0, 0.0, None),                            # > one row block
    (5, 64, False, 0.99, 0.95, 1.0, 0.05),                            # exactly one chunk
    (3, 1, False, 1.0, 0.95, 1.0, None),
]


@pytest.mark.parametrize("B,T,holes,gamma,lam_actor,lam_critic,alpha", CPU_CASES)
def test_cpu_matches_reference(B, T, holes, gamma, lam_actor, lam_critic, alpha):
    r, v, m = make_batch(B, T, seed=B * T, holes=holes, empty_rows=(1,) if B > 2 else (),
                         len1_rows=(2,) if B > 3 else ())
    errs = check_backend("cpu", r, v, m, gamma=gamma, lam_actor=lam_actor, lam_critic=lam_critic,
                         length_adaptive_alpha=alpha)
    assert max(errs) <= TOL, errs


def test_cpu_single_masked_token_anywhere():
    """One masked token at chunk edges (the CPU path cuts time into 31-step chunks), left padding,
    and a hole right before the last token: each row must be detected and carried forward."""
    T = 100
    rows = [[t] for t in (0, 1, 30, 31, 32, 61, 62, 92, 93, 98)] + [list(range(5)), [50, 51, 52]]
    m = torch.ones(len(rows), T, dtype=torch.bool)
    for i, holes in enumerate(rows):
        m[i, holes] = False
    m[-1, 80:] = False                                                 # hole plus right padding
    r, v, _ = make_batch(len(rows), T, seed=11)
    errs = check_backend("cpu", r, v, m, gamma=0.99, lam_actor=0.95, lam_critic=1.0,
                         length_adaptive_alpha=0.05)
    assert max(errs) <= TOL, errs


def test_float_mask_auto_backend_and_masked_outputs_zero():
    r, v, m = make_batch(6, 300, seed=1, holes=True, empty_rows=(3,))
    adv, ret = decoupled_gae(r, v, m.float(), gamma=1.0, lam_actor=0.95, lam_critic=1.0)
    ref_adv, ref_ret = decoupled_gae_reference(r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0)
    assert max(rel_err(adv, ref_adv), rel_err(ret, ref_ret)) <= TOL
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all() and (adv[3] == 0).all()


def test_reference_hand_example():
    """3 valid tokens and one masked (carry-forward), γ = 0.9, λ_actor = 0.5, λ_critic = 1.

    Valid chain 0 → 2 → 3 (position 1 masked: its r = 9, V = 7 are ignored).
      δ_3 = 1 + 0.9·0 − 0.8 = 0.2,  δ_2 = 0 + 0.9·0.8 − 0.6 = 0.12,  δ_0 = 0 + 0.9·0.6 − 0.5 = 0.04
      γλ_actor = 0.45: A_3 = 0.2, A_2 = 0.12 + 0.45·0.2 = 0.21, A_0 = 0.04 + 0.45·0.21 = 0.1345
      γλ_critic = 0.9: A_3 = 0.2, A_2 = 0.12 + 0.9·0.2 = 0.30, A_0 = 0.04 + 0.9·0.30 = 0.31
      returns = A^critic + V = [0.81, 0, 0.90, 1.00] = discounted return-to-go (1, 0.9, 0.81).
    """
    r = torch.tensor([[0.0, 9.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 7.0, 0.6, 0.8]])
    m = torch.tensor([[True, False, True, True]])
    adv, ret = decoupled_gae_reference(r, v, m, gamma=0.9, lam_actor=0.5, lam_critic=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.1345, 0.0, 0.21, 0.2]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.81, 0.0, 0.90, 1.0]], dtype=torch.float64))
    for backend in ("cpu", "reference"):
        a, rt = decoupled_gae(r, v, m, gamma=0.9, lam_actor=0.5, lam_critic=1.0, backend=backend)
        assert max(rel_err(a, adv), rel_err(rt, ret)) <= 1e-6


def test_naive_loop_matches_reference():
    """The peers' per-λ loop (benchmark baseline) has the same carry-forward semantics."""
    r, v, m = make_batch(5, 200, seed=2, holes=True, empty_rows=(4,))
    ref_adv, ref_ret = decoupled_gae_reference(r, v, m, gamma=0.99, lam_actor=0.95, lam_critic=1.0)
    adv, _ = naive_gae_loop(r, v, m.float(), 0.99, 0.95)
    _, ret = naive_gae_loop(r, v, m.float(), 0.99, 1.0)
    assert max(rel_err(adv, ref_adv), rel_err(ret, ref_ret)) <= TOL


def _next_valid_values(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """V at the next valid position after each position (0 past the last one), float64."""
    out = torch.zeros_like(v, dtype=torch.float64)
    for i in range(v.shape[0]):
        nxt = 0.0
        for t in range(v.shape[1] - 1, -1, -1):
            out[i, t] = nxt
            if m[i, t]:
                nxt = float(v[i, t])
    return out


@pytest.mark.parametrize("gamma", [0.99, 1.0])
def test_closed_form_lambda_zero_is_delta(gamma):
    r, v, m = make_batch(4, 150, seed=3, holes=True)
    delta = (r.double() + gamma * _next_valid_values(v, m) - v.double()) * m   # VC-PPO eq. 3
    adv, _ = decoupled_gae(r, v, m, gamma=gamma, lam_actor=0.0, lam_critic=1.0, backend="cpu")
    assert rel_err(adv, delta) <= 1e-6


def test_closed_form_lambda_one_gamma_one_is_monte_carlo():
    r, v, m = make_batch(4, 150, seed=4, holes=True)
    rm = r.double() * m
    to_go = rm.flip(1).cumsum(1).flip(1)                               # Σ future valid rewards
    adv, ret = decoupled_gae(r, v, m, gamma=1.0, lam_actor=1.0, lam_critic=1.0, backend="cpu")
    assert rel_err(adv, (to_go - v.double()) * m) <= 1e-6
    assert rel_err(ret, to_go * m) <= 1e-6                             # VC-PPO eq. 5, λ = 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    r, v, m = make_batch(5, 777, seed=5, holes=True)
    r, v = r.to(dtype), v.to(dtype)
    errs = check_backend("cpu", r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0,
                         length_adaptive_alpha=0.05)
    assert max(errs) <= TOL, errs


def _bad(**over):
    r, v, m = make_batch(2, 8, seed=6)
    kw = dict(rewards=r, values=v, response_mask=m, gamma=1.0, lam_actor=0.95, lam_critic=1.0)
    kw.update(over)
    return kw


def _with(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[1, 3] = value
    return x


BAD_INPUTS = {
    "shape": (lambda: _bad(values=torch.zeros(2, 9)), "equal shapes"),
    "not 2-D": (lambda: _bad(rewards=torch.zeros(16), values=torch.zeros(16),
                             response_mask=torch.ones(16, dtype=torch.bool)), "2-D"),
    "int mask": (lambda: _bad(response_mask=torch.ones(2, 8, dtype=torch.int64)), "bool or float"),
    "mask 0.5": (lambda: _bad(response_mask=_with(torch.ones(2, 8), 0.5)), "0 and 1"),
    "mask 2": (lambda: _bad(response_mask=_with(torch.ones(2, 8), 2.0)), "0 and 1"),
    "nan values": (lambda: _bad(values=_with(torch.zeros(2, 8), float("nan"))), "values"),
    "inf rewards": (lambda: _bad(rewards=_with(torch.zeros(2, 8), float("inf"))), "rewards"),
    "nan masked reward": (lambda: _bad(rewards=_with(torch.zeros(2, 8), float("nan")),
                                       response_mask=torch.zeros(2, 8)), "rewards"),
    "int values": (lambda: _bad(values=torch.zeros(2, 8, dtype=torch.int32)), "values"),
    "gamma": (lambda: _bad(gamma=1.5), "gamma"),
    "lam_actor": (lambda: _bad(lam_actor=-0.1), "lam_actor"),
    "lam_critic": (lambda: _bad(lam_critic=1.01), "lam_critic"),
    "alpha 0": (lambda: _bad(length_adaptive_alpha=0.0), "length_adaptive_alpha"),
    "alpha < 0": (lambda: _bad(length_adaptive_alpha=-0.05), "length_adaptive_alpha"),
    "backend": (lambda: _bad(backend="cuda-graph"), "backend"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises(case):
    make, match = BAD_INPUTS[case]
    kw = make()
    backends = ("cpu", "reference") if "backend" not in kw else (kw.pop("backend"),)
    for backend in backends:
        with pytest.raises(ValueError, match=match):
            decoupled_gae(**kw, backend=backend)


def test_nan_in_holes_batch_raises():
    r, v, m = make_batch(3, 50, seed=7, holes=True)
    v[1, ~m[1]] = float("nan")                                         # only at masked positions
    with pytest.raises(ValueError, match="values"):
        decoupled_gae(r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0, backend="cpu")


def test_out_buffers_are_written_and_returned():
    r, v, m = make_batch(70, 300, seed=12, holes=True)                 # 2 row blocks, holes
    m[3:, :] = False
    m[3:, :100] = True                                                 # prefix-only rows too
    ref_adv, ref_ret = decoupled_gae_reference(r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0)
    for backend in ("cpu", "reference"):
        bufs = (torch.full((70, 300), 7.0), torch.full((70, 300), 7.0))
        adv, ret = decoupled_gae(r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0,
                                 backend=backend, out=bufs)
        assert adv is bufs[0] and ret is bufs[1]
        assert max(rel_err(adv, ref_adv), rel_err(ret, ref_ret)) <= TOL
    for bad in ((torch.empty(70, 300),), (torch.empty(70, 300), torch.empty(70, 300).double()),
                (torch.empty(70, 300), torch.empty(70, 299)),
                (torch.empty(70, 300), torch.empty(300, 70).T)):
        with pytest.raises(ValueError, match="out"):
            decoupled_gae(r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0, out=bad)


def test_empty_batch():
    z = torch.zeros(0, 5)
    adv, ret = decoupled_gae(z, z, z.bool(), gamma=1.0, lam_actor=0.95, lam_critic=1.0)
    assert adv.shape == ret.shape == (0, 5)


_THREADS_PROBE = """
import json, torch
from vcppo_megatron.algorithms.gae import decoupled_gae
before = torch.get_num_threads()
r, v, m = torch.zeros(64, 16), torch.randn(64, 16), torch.ones(64, 16)
decoupled_gae(r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0, backend="cpu")
import numba
print(json.dumps([before, torch.get_num_threads(), numba.get_num_threads()]))
"""


def test_cpu_gae_leaves_torch_threads_alone():
    """numba's OpenMP layer sets the process's OpenMP thread count when it starts: a trainer rank
    at OMP_NUM_THREADS=1 ran every later torch / vLLM op on 2 threads. Fresh processes: numba
    starts its threads once per process. Without NUMBA_NUM_THREADS numba follows torch's count;
    with it set higher, torch's count is restored after the call."""
    root = Path(__file__).resolve().parents[2]
    for numba_threads, expect in ((None, [1, 1, 1]), ("2", [1, 1, 2])):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
        env.pop("NUMBA_NUM_THREADS", None)
        if numba_threads:
            env["NUMBA_NUM_THREADS"] = numba_threads
        proc = subprocess.run([sys.executable, "-c", _THREADS_PROBE], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == expect, (numba_threads, proc.stdout)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whitening_single_rank(shift_mean):
    r, v, m = make_batch(6, 120, seed=8, holes=True)
    adv, _ = decoupled_gae(r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0)
    out = whiten_advantages(adv, m, shift_mean=shift_mean)
    x = adv.double()[m]
    mean, var = x.mean(), x.var(unbiased=True)
    expect = torch.zeros_like(adv, dtype=torch.float64)
    expect[m] = (x - mean) / torch.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    assert rel_err(out, expect) <= 1e-6
    assert (out[~m] == 0).all()
    if shift_mean:
        assert abs(float(out.double()[m].mean())) < 1e-6


# ------------------------------------------------------------------------------------- triton

def _triton_interpreter_cases() -> dict:
    """Run in a subprocess with TRITON_INTERPRET=1: rel errors of the Triton backend per case."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from vcppo_megatron.algorithms.gae_triton import decoupled_gae_triton

    # (B, T, block_t, holes, dtype, gamma, lam_actor, lam_critic, alpha)
    cases = [
        (3, 5, None, False, torch.float32, 1.0, 0.95, 1.0, None),       # one chunk, T < block
        (5, 1001, 128, True, torch.float32, 1.0, 0.95, 1.0, None),      # 8 chunks, odd T, holes
        (5, 1001, 256, True, torch.float32, 0.99, 0.95, 0.9, 0.05),     # length-adaptive
        (2, 2048, 512, False, torch.float32, 0.99, 0.0, 1.0, None),     # λ = 0
        (2, 2048, 256, True, torch.float32, 1.0, 1.0, 1.0, None),       # λ = 1, γ = 1
        (2, 1500, 32, True, torch.float32, 0.99, 0.95, 1.0, None),      # 47 chunks
        (3, 300, 64, True, torch.bfloat16, 1.0, 0.95, 1.0, None),
        (3, 300, 64, False, torch.float16, 0.99, 0.95, 1.0, 0.05),
    ]
    out = {}
    for B, T, block, holes, dtype, gamma, la, lc, alpha in cases:
        r, v, m = make_batch(B, T, seed=T + B, holes=holes, empty_rows=(1,), len1_rows=(2,)
                             if B > 2 else ())
        r, v = r.to(dtype), v.to(dtype)
        kw = dict(gamma=gamma, lam_actor=la, lam_critic=lc, length_adaptive_alpha=alpha)
        ref_adv, ref_ret = decoupled_gae_reference(r, v, m, **kw)
        for schedule in ("single", "two_pass"):
            adv, ret = decoupled_gae_triton(r, v, m, block_t=block, schedule=schedule, **kw)
            out[f"{B}x{T}/{block}/{dtype}/{gamma}/{la}/{lc}/{alpha}/{schedule}"] = max(
                rel_err(adv, ref_adv), rel_err(ret, ref_ret))
    # the public dispatch accepts CPU tensors for backend="triton" under the interpreter
    r, v, m = make_batch(2, 40, seed=9, holes=True)
    adv, _ = decoupled_gae(r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0, backend="triton")
    bufs = (torch.empty(2, 40), torch.empty(2, 40))
    adv, _ = decoupled_gae(r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0, backend="triton",
                           out=bufs)
    out["dispatch"] = rel_err(adv, decoupled_gae_reference(r, v, m, gamma=1.0, lam_actor=0.95,
                                                           lam_critic=1.0)[0])
    out["out= written"] = 0.0 if adv is bufs[0] else 1.0
    return out


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_triton_kernel_under_interpreter():
    here = Path(__file__).resolve()
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here.parents[1]),
                                           str(here.parents[2]), os.environ.get("PYTHONPATH", "")]))
    code = "import json, test_gae; print(json.dumps(test_gae._triton_interpreter_cases()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errs) == 18
    assert max(errs.values()) <= TOL, errs


def _compile_sm90(kernel, inputs: str, mask: str, extra: dict, constexprs: dict, warps: int) -> str:
    """Compile a kernel for the H100 (sm_90a) on this CPU machine; return ptxas' resource report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    sig = {"r_ptr": inputs, "v_ptr": inputs, "m_ptr": mask, "ga_ptr": "*fp32", **extra,
           "T": "i32", "n_chunks": "i32", "gamma": "fp32", "gc": "fp32",
           **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(ASTSource(kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"], kernel.__name__
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        proc = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_triton_kernels_compile_for_h100_without_spills():
    """The interpreter does not compile; this builds every kernel for sm_90a as the dispatcher
    launches it (fp32 / bf16 inputs, float / bool mask, 1024-step chunks) and checks that ptxas
    keeps everything in registers (a spill would cost bandwidth in a memory-bound kernel)."""
    from vcppo_megatron.algorithms import gae_triton as gt

    out2 = {"adv_ptr": "*fp32", "ret_ptr": "*fp32"}
    block = {"BLOCK": gt.BLOCK_T}
    for inputs, mask in (("*fp32", "*fp32"), ("*bf16", "*u8")):
        reports = [
            _compile_sm90(gt._row_scan_kernel, inputs, mask, out2, block, 4),
            _compile_sm90(gt._chunk_aggregate_kernel, inputs, mask, {"agg_ptr": "*fp32"}, block, 4),
            _compile_sm90(gt._chunk_scan_kernel, inputs, mask, {"agg_ptr": "*fp32", **out2},
                          {**block, "NC_BLOCK": 32}, 4)]
        for report in reports:
            regs = [int(n) for n in re.findall(r"Used (\d+) registers", report)]
            assert regs and max(regs) <= 255, report
            assert not re.search(r"[1-9]\d* bytes spill (stores|loads)", report), report


@pytest.mark.skipif(HAS_TRITON, reason="only without triton")
def test_triton_backend_without_triton_raises():
    r, v, m = make_batch(2, 8, seed=10)
    with pytest.raises(ValueError, match="triton"):
        decoupled_gae(r, v, m, gamma=1.0, lam_actor=0.95, lam_critic=1.0, backend="triton")


@pytest.mark.gpu
def test_triton_cuda_matches_reference():
    """Real CUDA kernels (default 1024-step chunks), both schedules and the automatic pick: long
    rows, holes, bf16, length-adaptive, a float mask."""
    from vcppo_megatron.algorithms.gae_triton import decoupled_gae_triton

    for B, T, holes, dtype, alpha in ((64, 20000, True, torch.float32, None),
                                      (16, 32768, False, torch.bfloat16, 0.05),
                                      (7, 1001, True, torch.float32, 0.05),
                                      (1100, 3000, True, torch.float32, None)):
        r, v, m = make_batch(B, T, seed=T, holes=holes, empty_rows=(1,), len1_rows=(2,))
        r, v = r.to(dtype), v.to(dtype)
        if B == 7:
            m = m.float()
        kw = dict(gamma=1.0, lam_actor=0.95, lam_critic=1.0, length_adaptive_alpha=alpha)
        ref_adv, ref_ret = decoupled_gae_reference(r, v, m, **kw)
        adv, ret = decoupled_gae(r.cuda(), v.cuda(), m.cuda(), backend="auto", **kw)
        assert max(rel_err(adv.cpu(), ref_adv), rel_err(ret.cpu(), ref_ret)) <= TOL
        for schedule in ("single", "two_pass"):
            adv, ret = decoupled_gae_triton(r.cuda(), v.cuda(), m.cuda(), schedule=schedule, **kw)
            assert max(rel_err(adv.cpu(), ref_adv), rel_err(ret.cpu(), ref_ret)) <= TOL, schedule
