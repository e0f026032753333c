"""tools/gpu_checks.sh on CPU, with a stand-in interpreter (no GPU, no real test run): it passes
shellcheck; every issue-14 GPU test file is one step and the catch-all step leaves it out; the
table names each step with its items, exit code and pytest counts; a failing step gives a
non-zero exit; named steps run alone; a step that could pass the time budget is skipped and said
so; wheels are unpacked only for modules that are not importable."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_checks.sh"
STAND_IN = """#!/usr/bin/env bash
printf '%s\\n' "$*" "PYTHONPATH=${{PYTHONPATH:-}}" >> "$CALLS"
if [[ "$1" == - && $# -gt 1 ]]; then exec {real} "$@"; fi    # the wheel unpacking: real Python
cat > /dev/null
if [[ -n "${{FAIL_ON:-}}" && "$*" == *"$FAIL_ON"* ]]; then echo "1 failed, 2 passed, 3 warnings in 1.5s"; exit 1; fi
echo "2 passed, 1 skipped, 4 warnings in 1.0s"
"""


def _run(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str], str]:
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN.format(real=sys.executable))
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    out = tmp_path / "out"
    full_env = {**os.environ, "PYTHON": str(stand_in), "CALLS": str(calls), "GPU_CHECKS_OUT": str(out), **env}
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env,
                          stdin=subprocess.DEVNULL, timeout=120)
    return proc, calls.read_text().splitlines(), (out / "summary.txt").read_text()


def test_script_passes_shellcheck_and_runs_each_issue14_file_as_one_step():
    from test_slurm_scripts import _shellcheck

    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    out = subprocess.run([_shellcheck(), str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = SCRIPT.read_text()
    gpu = re.compile(r"^pytestmark = pytest\.mark\.gpu|^@pytest\.mark\.gpu|marks=pytest\.mark\.gpu", re.M)
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests" / "unit").glob("test_cuda_*.py")
                   if gpu.search(p.read_text()))
    named = re.findall(r"^step i14_\w+ .*?(tests/unit/test_cuda_\w+\.py)$", text, re.M)
    assert sorted(named) == files, (named, files)
    listed = re.search(r"^I14=\((.*?)\)$", text, re.M | re.S).group(1).split()
    assert sorted(listed) == files


def test_table_exit_code_selection_and_budget(tmp_path):
    proc, calls, summary = _run(tmp_path, FAIL_ON="test_cuda_stage.py")
    assert proc.returncode == 1, proc.stderr                   # one step failed
    rows = [line.split("|")[1:-1] for line in summary.splitlines()]
    steps = [r[0].strip() for r in rows]
    assert steps == ["deps", "i14_te", "i14_colocation", "i14_launch", "i14_stage", "i14_data_path",
                     "i14_ddp_overlap", "gpu_tests", "bench_gae", "bench_train_0.5b", "bench_train_1.5b",
                     "bench_sync"], steps
    by_step = {r[0].strip(): [c.strip() for c in r] for r in rows}
    assert by_step["i14_stage"][1:4] == ["6", "exit 1", "1 failed, 2 passed"]
    assert by_step["i14_data_path"][1:4] == ["12-14", "exit 0", "2 passed, 1 skipped"]
    assert by_step["i14_colocation"][1] == "2,5"
    gpu_tests = next(c for c in calls if "-m gpu" in c and c.endswith(" tests"))
    for name in ("te", "colocation", "launch", "stage", "data_path", "overlap"):
        assert f"--ignore=tests/unit/test_cuda_{name}.py" in gpu_tests, gpu_tests
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])      # the table comes last

    proc, calls, summary = _run(tmp_path, "i14_stage")            # one step by name (and deps)
    assert proc.returncode == 0 and [line.split("|")[1].strip() for line in summary.splitlines()] == \
        ["deps", "i14_stage"]

    proc, calls, summary = _run(tmp_path, GPU_CHECKS_BUDGET_S="170")     # steps whose limit passes it
    skipped = [line.split("|")[1].strip() for line in summary.splitlines() if "skipped" in line.split("|")[3]]
    assert skipped == ["i14_data_path", "gpu_tests", "bench_train_0.5b", "bench_train_1.5b"], summary
    assert "over GPU_CHECKS_BUDGET_S=170" in summary and proc.returncode == 0


def test_wheels_unpacked_only_for_missing_modules(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, module in (("gcfake_mod-1.0-py3-none-any.whl", "gcfake_mod"), ("yaml-9.9-py3-none-any.whl", "yaml")):
        with zipfile.ZipFile(wheels / name, "w") as z:
            z.writestr(f"{module}/__init__.py", "VALUE = 1\n")
            z.writestr(f"{module}-1.0.dist-info/METADATA", "Name: x\n")
    site = tmp_path / "site"
    proc, calls, _ = _run(tmp_path, "deps", GPU_CHECKS_WHEELS=str(wheels), GPU_CHECKS_SITE=str(site))
    assert f"PYTHONPATH={site}" in {c.split(":")[0] for c in calls}, calls       # the steps see it
    assert (site / "gcfake_mod" / "__init__.py").exists(), proc.stdout
    assert not (site / "yaml").exists(), "an importable module was shadowed"
    assert "unpacked for gcfake_mod" in proc.stdout and "yaml-9.9-py3-none-any.whl: already importable" in proc.stdout
