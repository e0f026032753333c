"""slurm/common.sh points the caches that default under ~ (vLLM, Triton, TorchInductor, HF, the XDG
roots) into the run directory, unless the user set them: a container started with
--no-container-mount-home may leave ~ unwritable. Simulated job (fake srun / scontrol, 1 task) with
HOME read-only; the stand-in trainer writes into every cache directory it was given."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from test_slurm_scripts import SCRIPTS, _fake_slurm_env

CACHES = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "TRITON_CACHE_DIR",
          "TORCHINDUCTOR_CACHE_DIR", "HF_HOME")

_DUMP = """
import json, os, sys
run_dir = sys.argv[sys.argv.index("--config") + 2].split("=", 1)[1]
names = {names!r}
for name in names:                                  # every cache directory exists and is writable
    with open(os.path.join(os.environ[name], "probe"), "w") as f:
        f.write("ok")
info = {{name: os.environ[name] for name in names}}
info["VLLM_NO_USAGE_STATS"] = os.environ.get("VLLM_NO_USAGE_STATS")
open(os.path.join(run_dir, "env.json"), "w").write(json.dumps(info))
"""


def test_caches_go_to_the_run_dir_unless_set(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)                                   # like an unmounted, read-only home
    own_triton = tmp_path / "my_triton"
    own_triton.mkdir()
    (tmp_path / "fake_trainer.py").write_text(textwrap.dedent(_DUMP.format(names=CACHES)))
    env = _fake_slurm_env(tmp_path, SCRIPTS[0])
    for name in CACHES + ("VLLM_NO_USAGE_STATS",):
        env.pop(name, None)
    env.update(SLURM_JOB_ID="31", SLURM_JOB_NAME="cache", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost",
               GPUS_PER_NODE="1", VENV=str(Path(sys.executable).parents[1]), RUN_ROOT=str(tmp_path / "runs"),
               TRAIN_MODULE="fake_trainer", PYTHONPATH=str(tmp_path), HOME=str(home),
               TRITON_CACHE_DIR=str(own_triton))
    try:
        out = subprocess.run(["bash", str(SCRIPTS[0])], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
    finally:
        home.chmod(0o755)
    run_dir = tmp_path / "runs" / "cache-31"
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*.log")) if run_dir.exists() else ""
    assert out.returncode == 0, out.stdout + out.stderr + logs
    info = json.loads((run_dir / "env.json").read_text())
    assert info.pop("TRITON_CACHE_DIR") == str(own_triton)            # the user's choice is kept
    assert info.pop("VLLM_NO_USAGE_STATS") == "1"
    for name, path in info.items():
        assert Path(path).parent == run_dir / "cache", (name, path)
        assert (Path(path) / "probe").read_text() == "ok", name
    assert len(set(info.values())) == len(info)                     # one directory per cache
    assert not any(home.iterdir())
