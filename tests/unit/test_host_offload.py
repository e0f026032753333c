"""Optimizer state offload through pinned, reused host buffers (engines/host_offload.py).

On this CPU machine the "device" is the cpu itself: the offload still copies every tensor into a
host buffer of its own, so the values, the buffer reuse and the training continuing bit-identically
can be checked. What only CUDA does (pinned allocation, non-blocking copies, a synchronisation
before the cache is emptied) is checked with torch.cuda and the allocation monkeypatched and
recorded in call order."""
from __future__ import annotations

import contextlib
import types

import torch

from vcppo_megatron.engines.host_offload import OptimizerStateOffload


def _model_and_adam(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    # megatron's structure: a chained optimizer of wrappers around torch optimizers
    return model, adam, types.SimpleNamespace(chained_optimizers=[types.SimpleNamespace(optimizer=adam)])


def _train_step(model, adam, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    adam.zero_grad()
    model(torch.randn(4, 6, generator=g)).square().sum().backward()
    adam.step()


def test_offload_restore_keeps_training_bit_identical():
    ref_model, ref_adam, _ = _model_and_adam()
    model, adam, chained = _model_and_adam()
    offload = OptimizerStateOffload(torch.device("cpu"), pin=False)
    pointers = []
    for step in range(3):
        _train_step(ref_model, ref_adam, step)
        _train_step(model, adam, step)
        before = {k: v.clone() for k, v in adam.state[next(iter(adam.state))].items()}
        moved = offload.offload(chained)
        assert moved == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
            v.numel() * v.element_size() for s in adam.state.values() for v in s.values())
        state = adam.state[next(iter(adam.state))]
        assert all(torch.equal(state[k], before[k]) for k in before)
        pointers.append(state["exp_avg"].data_ptr())
        assert offload.offload(chained) == 0                     # already offloaded: nothing moves
        assert offload.restore(chained) == moved
        assert state["exp_avg"].data_ptr() != pointers[-1]            # back in a tensor of its own
    assert len(set(pointers)) == 1, "the host buffer is allocated once and reused"
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_pinned_non_blocking_copies_and_one_sync_before_freeing(monkeypatch):
    model, adam, chained = _model_and_adam()
    _train_step(model, adam, 0)
    calls: list[str] = []
    real_empty, real_copy = torch.empty, torch.Tensor.copy_

    def empty(*args, pin_memory=False, **kwargs):
        if kwargs.get("device") == "cpu":
            calls.append(f"alloc pinned={pin_memory}")
        return real_empty(*args, **kwargs)

    def copy_(self, src, non_blocking=False):
        calls.append(f"copy non_blocking={non_blocking}")
        return real_copy(self, src, non_blocking=False)

    # an earlier test in this process may have applied the CPU compatibility layer: its torch-function
    # mode re-dispatches each patched call once more, which would be recorded twice here
    stack = torch.overrides._get_current_function_mode_stack()
    suspend = torch.overrides._pop_mode_temporarily() if stack else contextlib.nullcontext()
    with suspend:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("synchronize"))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
        monkeypatch.setattr(torch, "empty", empty)
        monkeypatch.setattr(torch.Tensor, "copy_", copy_)
        offload = OptimizerStateOffload(torch.device("cpu"))          # pin chosen from torch.cuda
        assert offload.pin
        offload.offload(chained)
        n = 4 + 3 * 4                                                  # 4 params + (step, exp_avg, exp_avg_sq) each
        assert calls[:2 * n:2] == ["alloc pinned=True"] * n and calls[1:2 * n:2] == ["copy non_blocking=True"] * n
        assert calls[2 * n:] == ["synchronize", "empty_cache"]
        calls.clear()
        offload.restore(chained)
        offload.offload(chained)                                       # second cycle: buffers reused
        assert "alloc pinned=True" not in calls and calls.count("synchronize") == 2
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert not OptimizerStateOffload(torch.device("cpu")).pin     # no CUDA: pageable (pinning needs it)
