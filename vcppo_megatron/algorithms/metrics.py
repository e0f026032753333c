"""Metrics over a global batch, accumulated per micro-batch and reduced over a process group.

Three kinds, all exact over the global batch (no mean of micro-batch means):
- additive shares (what `losses.py` returns: each already divided by a global count) are summed;
- masked statistics (mean, std, min, max) of values, returns, advantages are kept as sums;
- explained variance 1 - Var(R - V) / Var(R) is kept as sums of R, R², R - V and (R - V)²;
  it is left out of the result when Var(R) = 0 (undefined).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor

_F64 = torch.float64


class MetricAccumulator:
    """Collects metrics of the micro-batches of one global batch; `reduce` returns floats."""

    def __init__(self) -> None:
        self._shares: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), dtype=_F64))
        # name -> [sum, sum of squares, count]; and running min / max
        self._moments: dict[str, Tensor] = defaultdict(lambda: torch.zeros(3, dtype=_F64))
        self._min: dict[str, Tensor] = defaultdict(lambda: torch.tensor(float("inf"), dtype=_F64))
        self._max: dict[str, Tensor] = defaultdict(lambda: torch.tensor(-float("inf"), dtype=_F64))
        # name -> [Σ R, Σ R², Σ (R-V), Σ (R-V)², count]
        self._ev: dict[str, Tensor] = defaultdict(lambda: torch.zeros(5, dtype=_F64))

    def add_shares(self, shares: dict[str, Tensor]) -> None:
        """Add additive metrics (micro-batch shares of global means)."""
        for name, value in shares.items():
            self._shares[name] += value.detach().to("cpu", _F64)

    def add_stats(self, name: str, x: Tensor, mask: Tensor) -> None:
        """Add the masked entries of `x` to the mean / std / min / max of `name`."""
        x, keep = x.detach().to("cpu", _F64), mask.detach().to("cpu") > 0
        sel = x[keep]
        self._moments[name] += torch.stack([sel.sum(), (sel * sel).sum(),
                                            torch.tensor(float(sel.numel()), dtype=_F64)])
        if sel.numel():
            self._min[name] = torch.minimum(self._min[name], sel.min())
            self._max[name] = torch.maximum(self._max[name], sel.max())

    def add_explained_variance(self, name: str, values: Tensor, returns: Tensor,
                               mask: Tensor) -> None:
        """Add masked tokens to the explained variance of `values` as predictors of `returns`."""
        keep = mask.detach().to("cpu") > 0
        ret = returns.detach().to("cpu", _F64)[keep]
        res = ret - values.detach().to("cpu", _F64)[keep]
        self._ev[name] += torch.stack([ret.sum(), (ret * ret).sum(), res.sum(), (res * res).sum(),
                                       torch.tensor(float(ret.numel()), dtype=_F64)])

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Combine over the ranks of `group` (None: this process only) and return the metrics."""
        share_names, moment_names, ev_names = sorted(self._shares), sorted(self._moments), sorted(self._ev)
        summed = torch.cat([torch.stack([self._shares[n] for n in share_names]) if share_names
                            else torch.zeros(0, dtype=_F64)]
                           + [self._moments[n] for n in moment_names] + [self._ev[n] for n in ev_names])
        mins = torch.stack([self._min[n] for n in moment_names]) if moment_names else torch.zeros(0, dtype=_F64)
        maxs = torch.stack([self._max[n] for n in moment_names]) if moment_names else torch.zeros(0, dtype=_F64)
        if group is not None:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(mins, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=group)
        out: dict[str, float] = {}
        pos = len(share_names)
        out.update(zip(share_names, summed[:pos].tolist()))
        for i, name in enumerate(moment_names):
            total, total_sq, count = summed[pos + 3 * i: pos + 3 * i + 3].tolist()
            mean = total / max(count, 1.0)
            out[f"{name}/mean"] = mean
            out[f"{name}/std"] = max(total_sq / max(count, 1.0) - mean * mean, 0.0) ** 0.5
            out[f"{name}/min"] = float(mins[i]) if count else float("nan")
            out[f"{name}/max"] = float(maxs[i]) if count else float("nan")
        pos += 3 * len(moment_names)
        for i, name in enumerate(ev_names):
            s_r, s_r2, s_res, s_res2, count = summed[pos + 5 * i: pos + 5 * i + 5].tolist()
            n = max(count, 1.0)
            var_returns = s_r2 / n - (s_r / n) ** 2
            var_residual = s_res2 / n - (s_res / n) ** 2
            if var_returns > 0:  # undefined (omitted) when every return is the same
                out[name] = 1.0 - var_residual / var_returns
        return out
