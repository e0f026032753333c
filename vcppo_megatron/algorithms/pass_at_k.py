"""pass@k (unbiased estimator of Chen et al. 2021, HumanEval) and avg@k from n samples per problem.

pass@k of one problem with c correct of n samples is 1 - C(n-c, k) / C(n, k): the chance that a
random k-subset of the n samples holds at least one correct one. It is computed as
1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the (huge) binomials. avg@k (what VAPO
reports as AIME24 avg@32) is the mean correctness of all samples, i.e. pass@1 estimated with k
samples per problem.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct out of `n` samples."""
    if not 0 <= c <= n:
        raise ValueError(f"c = {c}: expected 0 <= c <= n = {n}")
    if not 1 <= k <= n:
        raise ValueError(f"k = {k}: expected 1 <= k <= n = {n} samples per problem")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over problems (each with `n` samples)."""
    if not correct_counts:
        raise ValueError("correct_counts is empty: expected one count per problem")
    return float(np.mean([pass_at_k(n, c, k) for c in correct_counts]))


def avg_at_k(correct_counts: Sequence[int], n: int) -> float:
    """avg@n: the mean correctness of all samples (pass@1 estimated from `n` samples per problem)."""
    if not correct_counts:
        raise ValueError("correct_counts is empty: expected one count per problem")
    if n < 1 or any(not 0 <= c <= n for c in correct_counts):
        raise ValueError(f"correct_counts {list(correct_counts)[:8]}...: expected each in [0, n = {n}]")
    return float(sum(correct_counts)) / (n * len(correct_counts))


def default_ks(n: int) -> list[int]:
    """The k reported for `n` samples: powers of two below n, and n itself."""
    if n < 1:
        raise ValueError(f"n = {n}: expected >= 1 samples per problem")
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]
