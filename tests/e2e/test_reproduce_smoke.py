"""`python tools/reproduce.py --smoke` with the real trainer and reward-model command (one rank, the
short `sums` task, 2 RL steps): it tests the runner, not the result.

The VC-PPO Table 2 study runs (SFT, conversion, reward model, 4 arms): every arm finishes; the
report lists every arm of every study (Table 3's 1x and Table 4's 0.95 / 1.0 rows filled from the
shared Table 2 runs, the others NOT RUN) with a verdict line per claim and its figures; a second
sitting skips every finished stage. Then `--arm VAPO` runs VAPO Table 1's full-VAPO arm alone,
every VAPO technique on, from the same SFT policy and reward model. Running the other studies' 11
remaining distinct arms too would take ~3x as long (each run is a process: imports, vLLM engine,
evaluations); each only turns one of these features off or changes a number, their overrides are
checked against the config schema in tests/unit/test_reproduce.py, and `--smoke --all` is run by
hand (docs/REPRODUCTION.md names the measured time).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import study_arms  # noqa: E402
from vcppo_megatron.config import load_config  # noqa: E402


def _run(out: Path, *args: str, study: str = "vcppo-table2") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/reproduce.py", "--smoke", "--study", study,
                           "--out", str(out), *args], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_smoke_study_runs_every_arm_reports_and_skips_finished_runs(tmp_path):
    docs = ROOT / "docs" / "REPRODUCTION.md"
    before = docs.read_bytes() if docs.exists() else None
    first = _run(tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    log = first.stdout
    assert "4 distinct arm runs x 1 seeds (+ SFT and reward model per seed): 6 to run" in log
    for label in ("SFT cold start", "reward model", "vcppo-table2/GRPO", "vcppo-table2/PPO",
                  "vcppo-table2/VC-PPO w/o Decoupled-GAE", "vcppo-table2/VC-PPO"):
        assert re.search(rf"^\[reproduce \d/6\] seed 1234 {re.escape(label)}: done in", log, re.M), label
    assert len(list(tmp_path.glob("seed_1234/run_*/DONE.json"))) == 4
    assert (next(tmp_path.glob("seed_1234/sft_*")) / "hf" / "model.safetensors").is_file()
    assert (next(tmp_path.glob("seed_1234/reward_model_*")) / "metrics.json").is_file()

    report = (tmp_path / "REPRODUCTION.md").read_text()
    studies = study_arms.build_studies(load_config(study_arms.BASE_RECIPE, list(study_arms.SMOKE_OVERRIDES)))
    for study in studies.values():
        for arm in study.arms:
            assert re.search(rf"^\| {re.escape(arm.name)} \| [01]/1", report, re.M), arm.name
    for name in ("GRPO", "PPO", "VC-PPO w/o Decoupled-GAE", "VC-PPO", "λ_actor = 0.95", "λ_actor = 1.0",
                 "value pretraining 2 steps (1x)", "Vanilla PPO"):
        assert re.search(rf"^\| {re.escape(name)} \| 1/1 \|", report, re.M), name
    assert "| λ_actor = 0.9 | 0/1 (NOT RUN)" in report and "| VAPO | 0/1 (NOT RUN)" in report
    verdicts = re.findall(r"^\*\*Verdict: (REPRODUCED|NOT REPRODUCED|NOT RUN)\*\*$", report, re.M)
    assert len(verdicts) == 7 and report.count("\n### ") == 7
    assert verdicts[1] != "NOT RUN" and verdicts[-1] == "NOT RUN"   # PPO's position view ran; VAPO did not
    figures = {p.name for p in (tmp_path / "reproduction").glob("*.png")}
    assert {f"vcppo-table2_{x}.png" for x in ("length", "accuracy", "position", "value_pretrain")} <= figures
    for name in figures:
        assert f"(reproduction/{name})" in report
    assert "SMOKE settings" in report and "data.task=sums" in report

    second = _run(tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "0 to run, 6 finished before (skipped)" in second.stdout and "[reproduce " not in second.stdout
    assert (docs.read_bytes() if docs.exists() else None) == before        # smoke never writes docs/

    # one arm of another study (--arm): VAPO, every VAPO technique on (value warm-up from the
    # reward model, length-adaptive GAE, clip-higher, token-level loss, positive-example LM loss,
    # group sampling), on the seed's shared SFT policy and reward model
    third = _run(tmp_path, "--arm", "VAPO", study="vapo-table1")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "1 distinct arm runs x 1 seeds (+ SFT and reward model per seed): 1 to run, 2 finished before" \
        in third.stdout, third.stdout[-2000:]
    assert re.search(r"^\[reproduce 1/1\] seed 1234 vapo-table1/VAPO: done in", third.stdout, re.M)
    report = (tmp_path / "REPRODUCTION.md").read_text()
    assert re.search(r"^\| VAPO \| 1/1 \|", report, re.M) and "| Vanilla PPO | 1/1 |" in report
    assert "| VAPO w/o Clip-Higher | 0/1 (NOT RUN)" in report
    assert (tmp_path / "reproduction" / "vapo-table1_length.png").is_file()
