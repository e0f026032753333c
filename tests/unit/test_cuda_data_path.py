"""Issue 14, items 12-14 on one GPU: the RL step's per-token tensors stay on the GPU, GAE runs the
Triton kernels, and the chunked log-prob head makes no host sync.

- One RL step of the real trainer (`Trainer._rl_step`, the demo's tiny model, real Megatron engines
  on cuda:0, a stand-in vLLM that returns fixed samples) runs the body of
  tests/unit/test_device_residency.py with the real device instead of the stand-in: between the
  first forward pass and the last loss no per-token tensor (two or more dimensions) is copied
  between host and device and no op mixes them, only experience.py moves rows in, GAE takes the
  Triton path once (the real kernels, on device tensors) and the losses get device tensors only.
- The log-prob / entropy head's forward and backward over many chunks (engines/logprobs.py) run
  under torch.cuda's sync debug mode "error" (any synchronising CUDA call raises) and call no op
  that needs the host to wait (values read, data-dependent shapes such as nonzero or boolean-mask
  indexing, copies to the host); gradients against a float64 reference. The CPU variant runs in the
  normal suite: it catches such an op (e.g. a per-chunk torch.nonzero) without a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cuda_utils import cuda_world
from fake_device import FakeCudaMode
from test_device_residency import CHECKED, assert_stays_on_the_device, make_trainer, run_checked_rl_step


@pytest.fixture(scope="module")
def cuda_trainer(tmp_path_factory):
    with cuda_world():
        t = make_trainer(tmp_path_factory.mktemp("residency_cuda"))
        yield t
        t.writer.close()


@pytest.mark.gpu
def test_rl_step_keeps_per_token_tensors_on_the_gpu(cuda_trainer, monkeypatch):
    for engine in (cuda_trainer.actor, cuda_trainer.critic):
        assert engine.core.device == torch.device("cuda", 0)
    mode = FakeCudaMode(CHECKED, real=True)
    result = run_checked_rl_step(cuda_trainer, monkeypatch, mode)
    assert_stays_on_the_device(mode, result)
    moved_in = sorted({r.where for r in mode.records if r.kind == "h2d"})
    print(f"RL step on CUDA: rows moved in at {moved_in}; {len(mode.records)} transfers in all, none between "
          f"the forward passes and the losses; GAE on the Triton path {len(result['gae_calls'])}x")


class HostSyncOps(TorchDispatchMode):
    """Records the ATen ops that make the host wait for the device: a value read on the host
    (`_local_scalar_dense`: item, bool, int, float), shapes that depend on values (nonzero,
    masked_select, unique; boolean-mask indexing goes through nonzero) and copies from a device
    to the host. A dispatch mode sees the custom autograd Function's backward too."""

    SYNCING = ("_local_scalar_dense", "nonzero", "nonzero_static", "argwhere", "masked_select", "unique",
               "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive")

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        to_host = (name == "_to_copy" and str(kwargs.get("device", "")).startswith("cpu")
                   and any(t.device.type != "cpu" for t in tensors))
        to_host |= name == "copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu"
        if name in self.SYNCING or to_host:
            self.calls.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu), "cpu"])
def test_logprob_head_makes_no_host_sync(device):
    from vcppo_megatron.engines.logprobs import vocab_parallel_logprobs

    tokens, hidden_size, vocab, chunk = 1000, 64, 512, 64                  # 16 chunks
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g, dtype=torch.float64)
    weight = 0.3 * torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    g_lp, g_ent = torch.randn(tokens, generator=g, dtype=torch.float64), torch.randn(tokens, generator=g,
                                                                                    dtype=torch.float64)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()   # float64 reference
    logp_all = torch.log_softmax(h_ref @ w_ref.t(), -1)
    ref_lp = logp_all.gather(1, targets[:, None])[:, 0]
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    torch.autograd.backward((ref_lp, ref_ent), (g_lp, g_ent))

    def inputs():
        h = hidden.float().to(device).requires_grad_()
        w = weight.float().to(device).requires_grad_()
        return h, w, targets.to(device), g_lp.float().to(device), g_ent.float().to(device)

    def head(h, w, t, gl, ge):
        lp, ent = vocab_parallel_logprobs(h, w, t, chunk_size=chunk)
        torch.autograd.backward((lp, ent), (gl, ge))
        return lp, ent

    head(*inputs())                                                        # warm-up: kernels, handles
    h, w, *rest = inputs()
    record = HostSyncOps()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")                            # a synchronising call raises
    try:
        with record:
            lp, ent = head(h, w, *rest)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert not record.calls, f"ops that make the host wait in the log-prob head: {record.calls}"
    assert lp.device.type == ent.device.type == h.grad.device.type == device
    for got, want in ((lp, ref_lp), (ent, ref_ent), (h.grad, h_ref.grad), (w.grad, w_ref.grad)):
        err = float((got.detach().double().cpu() - want.detach()).abs().max() / want.detach().abs().max())
        assert err <= 1e-5, err
