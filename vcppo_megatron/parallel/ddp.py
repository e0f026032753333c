"""Megatron DDP with parameter-gather overlap: make the parameters whole before reading them.

With `overlap_param_gather` the distributed optimizer updates only this rank's shard in its step;
the other data-parallel ranks' shards arrive bucket by bucket in the forward pre-hooks of the next
forward pass. Anything that reads the parameters outside a forward pass (the weight sync to the
rollout engine, checkpoints, copying a model) must gather them first.
"""
from __future__ import annotations

from typing import Any


def gather_params(model: Any) -> bool:
    """All-gather a megatron DDP model's parameters now if it overlaps the gather (waiting for a
    gather already in flight); False (nothing to do) for any other model. Collective over the
    model's data-parallel group when it does something."""
    if not getattr(model, "use_forward_hook", False):     # megatron DDP sets it for the overlap
        return False
    model.start_param_sync(force_sync=True)
    return True
