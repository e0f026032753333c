"""Advantage / value / return by token position in the response: the VC-PPO Fig. 2 bias view.

Response positions are grouped into `num_buckets` buckets of `bucket_size` tokens: bucket b holds
positions [b·size, (b+1)·size), the last bucket also every later position. Per quantity and bucket
the accumulator keeps the sufficient statistics (Σx, Σx², count) of valid tokens in float64, so a
reduce over a process group gives the statistics of the global batch exactly (no mean of means).
With a biased value model the mean advantage falls with position (VC-PPO §3.2, Fig. 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

_F64 = torch.float64


@dataclass(frozen=True)
class BucketStats:
    """Per-bucket masked statistics of one quantity ([num_buckets] float64 tensors)."""

    mean: Tensor
    std: Tensor
    count: Tensor


class PositionStats:
    """Accumulates masked per-position-bucket sums of named [N, R] tensors; `reduce` combines ranks."""

    def __init__(self, bucket_size: int, num_buckets: int) -> None:
        if bucket_size < 1:
            raise ValueError(f"bucket_size = {bucket_size}: expected >= 1 token")
        if num_buckets < 1:
            raise ValueError(f"num_buckets = {num_buckets}: expected >= 1")
        self.bucket_size = bucket_size
        self.num_buckets = num_buckets
        self._sums: dict[str, Tensor] = {}   # name -> [num_buckets, 3]: Σx, Σx², count

    def bucket_starts(self) -> list[int]:
        """First response position of each bucket."""
        return [b * self.bucket_size for b in range(self.num_buckets)]

    def add(self, name: str, x: Tensor, mask: Tensor) -> None:
        """Add the valid tokens of `x` [N, R] (mask > 0; position = column index) to `name`."""
        if x.shape != mask.shape or x.dim() != 2:
            raise ValueError(f"{name}: x {tuple(x.shape)} and mask {tuple(mask.shape)}: expected "
                             f"equal [N, R] shapes")
        x = x.detach().to("cpu", _F64)
        keep = (mask.detach().to("cpu") > 0).to(_F64)
        xm = torch.where(keep > 0, x, torch.zeros((), dtype=_F64))    # NaN-safe off the mask
        per_pos = torch.stack([xm.sum(0), (xm * xm).sum(0), keep.sum(0)], -1)     # [R, 3]
        bucket = torch.clamp(torch.arange(x.shape[1]) // self.bucket_size, max=self.num_buckets - 1)
        sums = self._sums.setdefault(name, torch.zeros(self.num_buckets, 3, dtype=_F64))
        sums.index_add_(0, bucket, per_pos)

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, BucketStats]:
        """Combine over `group` (None: this process); every rank must have added the same names."""
        names = sorted(self._sums)
        if not names:
            return {}
        stacked = torch.stack([self._sums[n] for n in names])
        if group is not None:
            stacked = stacked.clone()
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
        out = {}
        for name, s in zip(names, stacked):
            count = s[:, 2]
            n = count.clamp(min=1.0)
            mean = s[:, 0] / n
            var = (s[:, 1] / n - mean * mean).clamp(min=0.0)
            nan = torch.full_like(mean, float("nan"))
            out[name] = BucketStats(torch.where(count > 0, mean, nan),
                                    torch.where(count > 0, var.sqrt(), nan), count)
        return out

    @staticmethod
    def scalars(stats: dict[str, BucketStats], prefix: str = "position") -> dict[str, float]:
        """Flat metrics `<prefix>/<name>/bucket_<b>` = mean of bucket b (empty buckets left out)."""
        out = {}
        for name, st in stats.items():
            for b, (m, c) in enumerate(zip(st.mean.tolist(), st.count.tolist())):
                if c > 0:
                    out[f"{prefix}/{name}/bucket_{b:02d}"] = m
        return out
