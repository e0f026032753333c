"""Optimizer state to host memory and back through pinned, reused host buffers.

Megatron-core 0.16.1's `offload_to_cpu` / `restore_from_cpu` (optimizer/optimizer.py:344-380) move
each tensor with `.cpu()` / `.cuda()`: synchronous copies through pageable memory, and a fresh host
allocation at every offload. `OptimizerStateOffload` moves the same tensors (the optimizer's
parameters, i.e. the distributed optimizer's fp32 master shards, and every state tensor: Adam's
moments) into host buffers allocated once per tensor, page-locked when CUDA is present, with
non-blocking copies and one synchronisation per direction. The buffers stay allocated between
offloads (host memory: the size of the optimizer state, about 12 bytes per parameter of the
shard). Engines call `offload` / `restore` where they called megatron's pair.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import Tensor

_Slot = tuple[dict, Any]          # (container, key): container[key] is the tensor (param_group list or state dict)


def _inner_optimizers(optimizer: Any) -> list[Any]:
    """The torch optimizers inside a megatron (chained) optimizer, stub optimizers left out."""
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if getattr(opt, "optimizer", None) is not None and not getattr(opt, "is_stub_optimizer", False)]


def _slots(optimizer: Any) -> Iterator[tuple[tuple[int, Any], Tensor, Any]]:
    """(stable key, tensor, setter) for every tensor megatron's offload moves."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                if isinstance(param, Tensor):
                    yield (id(param), None), param.data, lambda t, p=param: setattr(p, "data", t)
        for param, state in inner.state.items():
            for name, value in state.items():
                if isinstance(value, Tensor):
                    yield (id(param), name), value, lambda t, s=state, n=name: s.__setitem__(n, t)


class OptimizerStateOffload:
    """Moves an optimizer's tensors between `device` and reused host buffers (pinned on CUDA)."""

    def __init__(self, device: torch.device, pin: Optional[bool] = None) -> None:
        self.device = torch.device(device)
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.offloaded = False
        self._host: dict[tuple[int, Any], Tensor] = {}

    def _buffer(self, key: tuple[int, Any], like: Tensor) -> Tensor:
        """The host buffer of one tensor: allocated (pinned if `pin`) on first use, then reused."""
        buf = self._host.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self.pin)
            self._host[key] = buf
        return buf

    def offload(self, optimizer: Any) -> int:
        """Copy every optimizer tensor on `device` into its host buffer and point the optimizer at
        it; returns the bytes moved. The device memory is released when the caller drops it."""
        if self.offloaded:
            return 0
        moved = 0
        for key, tensor, assign in list(_slots(optimizer)):
            if tensor.device != self.device:
                continue
            buf = self._buffer(key, tensor)
            buf.copy_(tensor, non_blocking=self.pin)
            assign(buf)
            moved += tensor.numel() * tensor.element_size()
        if self.pin:
            torch.cuda.synchronize()         # non-blocking copies complete before the GPU memory is freed
            torch.cuda.empty_cache()
        self.offloaded = True
        return moved

    def restore(self, optimizer: Any) -> int:
        """Copy the host buffers back to `device` (the buffers are kept for the next offload)."""
        if not self.offloaded:
            return 0
        moved = 0
        for key, tensor, assign in list(_slots(optimizer)):
            buf = self._host.get(key)
            if buf is None or tensor.data_ptr() != buf.data_ptr():      # not moved by `offload`
                continue
            on_device = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
            on_device.copy_(tensor, non_blocking=self.pin)
            assign(on_device)
            moved += tensor.numel() * tensor.element_size()
        if self.pin:
            torch.cuda.synchronize()         # copies done before the next offload rewrites the buffers
        self.offloaded = False
        return moved
