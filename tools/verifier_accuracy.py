#!/usr/bin/env python
"""Accuracy of the VC-PPO §4.1 rule-based verifier on the FULL benchmark answer sets.

For each dataset in datasets/ (GSM8K test, MATH-500, AIME24, AIME25) every golden answer is
written in several natural formats (must score +1) and perturbed into wrong answers (must score
-1); prints a markdown table of per-variant accuracy. Usage:

    python tools/verifier_accuracy.py [--workers 2] [--timeout 5] [--show-failures 20]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from vcppo_megatron.rewards import batch_math_reward, shutdown_reward_pools
from vcppo_megatron.rewards.selftest import (DATASET_FILES, build_cases, failures, format_table,
                                             load_dataset, tabulate)

DATASETS_DIR = Path(__file__).resolve().parents[1] / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--show-failures", type=int, default=20)
    args = parser.parse_args()

    table, rows = {}, []
    start = time.monotonic()
    for name, filename in DATASET_FILES.items():
        golds = [row["answer"] for row in load_dataset(DATASETS_DIR / filename)]
        cases = build_cases(name, golds)
        rewards = batch_math_reward([c.response for c in cases], [c.gold for c in cases],
                                    timeout_s=args.timeout, num_workers=args.workers)
        table.update(tabulate(cases, rewards))
        bad = failures(cases, rewards)
        rows.append(f"{name}: {len(golds)} problems, {len(cases)} cases, {len(bad)} failures")
        for case in bad[:args.show_failures]:
            rows.append(f"  FAIL {case.kind}/{case.variant}: gold={case.gold!r} "
                        f"response tail={case.response[-80:]!r}")
    shutdown_reward_pools()
    print(format_table(table))
    print()
    print("\n".join(rows))
    print(f"\nwall time {time.monotonic() - start:.1f} s ({args.workers} workers)")


if __name__ == "__main__":
    main()
