"""Run the papers' ablation studies at small scale on CPU and write docs/REPRODUCTION.md.

    python tools/reproduce.py --study vcppo-table2 [--study ...] | --all  [--arm NAME ...] [--seeds 3]
                              [--task chain_sums] [--out runs/reproduce] [--nproc 2] [--smoke] [--report-only]

Studies (tools/study_arms.py: every arm is overrides on examples/tiny_cot_cpu.yaml; identical
resolved settings run once): vcppo-table2, vcppo-table3, vcppo-table4, vapo-table1.

Per seed (trainer.seed = the recipe's seed + i): the SFT cold start runs once (a trainer run with
no value pretraining and no RL; its final evaluation is every arm's step 0) and is converted to
an HF directory every arm starts from (actor.model_path, trainer.sft_steps=0); the reward model
(`python -m vcppo_megatron.train_reward_model`) is trained once from it for the arms whose critic
starts from a reward model. Each finished stage writes DONE.json with the hash of its resolved
settings (and of the stages it builds on): a rerun skips it, so a study spans several sittings; a
killed run is started again on the same directory and the trainer resumes from its checkpoints.

The report (tools/study_report.py) is written from the finished runs: docs/REPRODUCTION.md with
figures under docs/reproduction/; `--report-only` rewrites it without running anything.
`--task chain_sums_graded` runs the studies on the pace-tagged variant of the task (a success rate the
prompt shows, so a critic has something to learn; study_arms.TASK_OVERRIDES): its runs go to
runs/reproduce_chain_sums_graded, its report to docs/REPRODUCTION_chain_sums_graded.md (figures under
docs/reproduction_chain_sums_graded/).
`--smoke`: every selected arm for 2 RL steps with tiny settings (study_arms.SMOKE_OVERRIDES, one
rank unless --nproc is given, one seed unless --seeds is) in a temporary directory (or --out); the report goes into
that directory, never docs/. It tests the runner, not the result.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from study_arms import (  # noqa: E402
    BASE_RECIPE,
    DEFAULT_TASK,
    SMOKE_OVERRIDES,
    STUDY_NAMES,
    TASK_OVERRIDES,
    UniqueRun,
    build_studies,
    dedupe,
    resolved_settings,
    settings_key,
    task_suffix,
)

DONE = "DONE.json"
TASKS = {"chain_sums": "data/chain_sums.py: sums of 13-18 letter-tagged digits worked out with running totals, "
                        "correct responses 101-171 tokens",
         "chain_sums_graded": "data/chain_sums.py: the chain_sums chains, each prompt opened by a pace tag (x careful, "
                              "y plain, z hurried) that scales the cold-start demonstrations' slip rates by 0.2, 1 "
                              "or 3",
         "sums": "data/synthetic.py: short sums, 7-14-token responses (the quick demo's task)"}
SFT_ONLY = ("trainer.value_pretrain_steps=0", "trainer.num_steps=0", "algo.advantage_estimator=grpo")


def task_note(task: str) -> str:
    """What a critic can learn on the task (the limit the value-based claims run into)."""
    if task == "chain_sums_graded":
        from vcppo_megatron.data.chain_sums import GRADED_SFT_SAMPLED_BY_PACE, GRADED_SFT_VALUE_CEILING, MAX_TERMS, \
            MIN_TERMS, PACES, demonstration_success, terms_value_ceiling

        rates = {(p, t): demonstration_success(p, t) for p in PACES for t in range(MIN_TERMS, MAX_TERMS + 1)}
        return ("\n\nWhat a critic can learn on this task: the pace tag sets how often the cold-start "
                f"demonstrations slip, so they are right from {max(rates.values()):.2f} (careful, {MIN_TERMS} terms) "
                f"to {min(rates.values()):.2f} (hurried, {MAX_TERMS} terms) of the time; a critic that knew each "
                f"pace's and length's rate would explain {terms_value_ceiling(rates):.2f} of the demonstrations' "
                "outcome variance at the first response token (`chain_sums.terms_value_ceiling`), against about 0.02 "
                "on `chain_sums` (docs/REPRODUCTION.md). The SFT policy (2400 steps; seed 1234 measured with "
                "`tools/chain_task_report.py --graded`) learns less of the spread: sampled accuracy "
                f"{_by_pace(GRADED_SFT_SAMPLED_BY_PACE)} by pace, a value ceiling of {GRADED_SFT_VALUE_CEILING:.2f}. "
                "This report tests whether the value-based claims, which did "
                "not reproduce on `chain_sums`, do when the critic has something to learn. The rules are the ones "
                "docs/REPRODUCTION.md states, fixed before any run of this task.")
    if task != DEFAULT_TASK:
        return ""
    from vcppo_megatron.data.chain_sums import GRADED_SFT_SAMPLED_BY_PACE, GRADED_SFT_VALUE_CEILING, \
        SFT_SAMPLED_ACCURACY, terms_value_ceiling

    lo, hi = min(SFT_SAMPLED_ACCURACY.values()), max(SFT_SAMPLED_ACCURACY.values())
    return ("\n\nWhat a critic can learn on this task: whether a chain ends right is decided mostly by the slips "
            "sampled along it, not by the prompt. The prompt shows the number of terms, which moves the SFT policy's "
            f"sampled accuracy only from {hi:.2f} to {lo:.2f}; a critic that knew each problem's success rate by its "
            f"number of terms would explain {terms_value_ceiling():.3f} of the return's variance at the first "
            "response token (`chain_sums.terms_value_ceiling`). Later tokens can do better only by checking the "
            "running totals already written for a slip, which a 2-layer critic trained for tens of steps does not "
            "learn (explained variance below). The value-based claims (position bias, value pretraining, "
            "decoupled GAE) are judged with this in mind. The pace-tagged variant of the task "
            "(`python tools/reproduce.py --task chain_sums_graded`, which writes its own report) tests them with a "
            f"critic that has something to learn: its SFT policy's success rate is {_by_pace(GRADED_SFT_SAMPLED_BY_PACE)} "
            f"by pace, a value ceiling of {GRADED_SFT_VALUE_CEILING:.2f} (data/chain_sums.py).")


def _by_pace(accuracy: dict[str, float]) -> str:
    return " / ".join(f"{a:.2f}" for _, a in sorted(accuracy.items()))


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def is_done(directory: Path, key: str) -> bool:
    """A stage finished with these settings: DONE.json is there and records `key`."""
    marker = directory / DONE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("key") == key
    except json.JSONDecodeError:
        return False


def mark_done(directory: Path, key: str, **info: Any) -> None:
    """Write DONE.json atomically (a stage killed while writing it counts as not finished)."""
    tmp = directory / (DONE + ".tmp")
    tmp.write_text(json.dumps(dict(key=key, **info), indent=2, default=str))
    os.replace(tmp, directory / DONE)


@dataclass
class Plan:
    """What a sitting works with: base settings, per-seed stage keys, the distinct arm runs."""

    recipe: Path
    base_overrides: tuple[str, ...]
    out: Path
    seeds: list[int]
    nproc: int
    sft_key: str
    rm_key: str
    runs: list[UniqueRun]
    task: str = DEFAULT_TASK        # --task (its overrides are in base_overrides)
    smoke: bool = False


def task_flag(plan: Plan) -> str:
    """The --task argument a command needs to address the plan's runs ('' for the default task)."""
    return "" if plan.task == DEFAULT_TASK else f" --task {plan.task}"


def make_plan(studies: dict[str, Any], names: list[str], *, recipe: Path, base_overrides: tuple[str, ...],
              out: Path, seeds: list[int], nproc: int, arms: list[str] | None = None) -> Plan:
    """Keys of the shared stages and the deduplicated runs of the studies `names` (only the runs
    of the arms named in `arms`, when given)."""
    sft = {k: v for k, v in resolved_settings(recipe, base_overrides + SFT_ONLY).items()
           if not k.startswith("reward_model.")}
    sft_key = settings_key(sft, "sft")
    rm_key = settings_key(resolved_settings(recipe, base_overrides), "reward_model", sft_key)
    runs = dedupe(recipe, base_overrides, [studies[n] for n in names], sft_key, rm_key)
    if arms is not None:
        runs = [r for r in runs if any(arm in arms for study, arm in r.members if study in names)]
    return Plan(recipe, base_overrides, out, seeds, nproc, sft_key, rm_key, runs)


def seed_dir(plan: Plan, seed: int) -> Path:
    return plan.out / f"seed_{seed}"


def sft_dir(plan: Plan, seed: int) -> Path:
    return seed_dir(plan, seed) / f"sft_{plan.sft_key}"


def rm_dir(plan: Plan, seed: int) -> Path:
    return seed_dir(plan, seed) / f"reward_model_{plan.rm_key}"


def run_dir(plan: Plan, run: UniqueRun, seed: int) -> Path:
    return seed_dir(plan, seed) / f"run_{run.key}"


def train_command(plan: Plan, overrides: list[str]) -> list[str]:
    """The trainer's command line: plain python for one rank, torchrun for more."""
    launcher = ([sys.executable] if plan.nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(plan.nproc)])
    return launcher + ["-m", "vcppo_megatron.train", "--config", str(plan.recipe), *overrides]


def stage_commands(plan: Plan, seed: int) -> dict[str, list[str]]:
    """The SFT and reward-model commands of a seed."""
    sft = sft_dir(plan, seed)
    return {
        "sft": train_command(plan, [*plan.base_overrides, *SFT_ONLY, f"trainer.seed={seed}",
                                    f"trainer.output_dir={sft}"]),
        "reward_model": [sys.executable, "-m", "vcppo_megatron.train_reward_model", "--config", str(plan.recipe),
                         *plan.base_overrides, f"trainer.seed={seed}", f"actor.model_path={sft / 'hf'}",
                         f"trainer.output_dir={rm_dir(plan, seed)}", f"reward_model.output_dir={rm_dir(plan, seed)}"],
    }


def arm_command(plan: Plan, run: UniqueRun, seed: int) -> list[str]:
    """An arm's trainer command for a seed (starts from the seed's SFT policy)."""
    extra = [f"critic.model_path={rm_dir(plan, seed)}"] if run.reward_model else []
    return train_command(plan, [*run.overrides, *extra, f"trainer.seed={seed}",
                                f"actor.model_path={sft_dir(plan, seed) / 'hf'}",
                                f"trainer.output_dir={run_dir(plan, run, seed)}"])


class Progress:
    """One line per run: k/N, elapsed, and an ETA from the runs finished in this sitting."""

    def __init__(self, total: int) -> None:
        self.total, self.k, self.t0, self.durations = total, 0, time.time(), []

    def start(self, label: str) -> float:
        self.k += 1
        left = self.total - self.k + 1
        eta = (f"ETA {_hms(sum(self.durations) / len(self.durations) * left)}" if self.durations
               else "ETA after the first run")
        print(f"[reproduce {self.k}/{self.total}] {label}: running  elapsed {_hms(time.time() - self.t0)}  {eta}",
              flush=True)
        return time.time()

    def finish(self, label: str, started: float, ok: bool) -> None:
        took = time.time() - started
        if ok:
            self.durations.append(took)
        print(f"[reproduce {self.k}/{self.total}] {label}: {'done' if ok else 'FAILED'} in {_hms(took)}", flush=True)


def _env(nproc: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def run_stage(command: list[str], directory: Path, key: str, log: Path, progress: Progress, label: str,
              nproc: int, after: Any = None, **info: Any) -> bool:
    """Run one stage unless it is done; DONE.json only after it (and `after`) succeeded."""
    started = progress.start(label)
    directory.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        f.flush()
        rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(nproc)).returncode
    ok = rc == 0
    if ok and after is not None:
        after()
    if ok:
        mark_done(directory, key, command=shlex.join(command), seconds=round(time.time() - started, 1), **info)
    else:
        lines = log.read_text().splitlines()
        errors = [t for t in lines if "error: " in t][:4]          # the trainer's own error lines, if any
        print(f"   exit code {rc}; {log}:\n" + "\n".join("   | " + t for t in errors + ["..."] + lines[-8:]),
              flush=True)
    progress.finish(label, started, ok)
    return ok


def _convert_sft(sft: Path) -> None:
    """The SFT run's actor checkpoint as the HF directory every arm of the seed starts from."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # Megatron's notes on missing Apex / TE
        from vcppo_megatron.checkpoint import convert_megatron_to_hf

        convert_megatron_to_hf(sft / "checkpoints" / "actor", sft / "hf", progress=False)


def execute(plan: Plan) -> list[str]:
    """Run every pending stage, seed by seed; returns the labels of stages that failed."""
    need_rm = any(r.reward_model for r in plan.runs)
    pending = []
    for seed in plan.seeds:
        pending += [("sft", seed, None)] if not is_done(sft_dir(plan, seed), plan.sft_key) else []
        pending += [("rm", seed, None)] if need_rm and not is_done(rm_dir(plan, seed), plan.rm_key) else []
        pending += [("arm", seed, r) for r in plan.runs if not is_done(run_dir(plan, r, seed), r.key)]
    done_already = len(plan.seeds) * (1 + need_rm + len(plan.runs)) - len(pending)
    print(f"== {len(plan.runs)} distinct arm runs x {len(plan.seeds)} seeds (+ SFT"
          f"{' and reward model' if need_rm else ''} per seed): {len(pending)} to run, {done_already} finished "
          f"before (skipped); output {plan.out}", flush=True)
    progress = Progress(len(pending))
    failed: list[str] = []
    logs = plan.out / "logs"
    for kind, seed, run in pending:
        cmds = stage_commands(plan, seed)
        what = {"sft": "SFT", "rm": "reward model"}.get(kind) or run.members[0][1]
        if kind != "sft" and not is_done(sft_dir(plan, seed), plan.sft_key):
            print(f"   seed {seed}: skipping {what}: the SFT stage did not finish", flush=True)
            failed.append(f"seed {seed} {what}")
            continue
        if kind == "sft":
            d = sft_dir(plan, seed)
            ok = run_stage(cmds["sft"], d, plan.sft_key, logs / f"seed_{seed}_sft.log", progress,
                           f"seed {seed} SFT cold start", plan.nproc, after=lambda d=d: _convert_sft(d))
        elif kind == "rm":
            ok = run_stage(cmds["reward_model"], rm_dir(plan, seed), plan.rm_key,
                           logs / f"seed_{seed}_reward_model.log", progress, f"seed {seed} reward model", 1)
        else:
            if run.reward_model and not is_done(rm_dir(plan, seed), plan.rm_key):
                print(f"   seed {seed}: skipping {run.members[0][1]}: the reward model did not finish", flush=True)
                failed.append(f"seed {seed} {run.members[0][1]}")
                continue
            names = " = ".join(f"{s}/{a}" for s, a in run.members)
            ok = run_stage(arm_command(plan, run, seed), run_dir(plan, run, seed), run.key,
                           logs / f"seed_{seed}_run_{run.key}.log", progress, f"seed {seed} {names}", plan.nproc,
                           members=run.members, overrides=run.overrides)
        if not ok:
            failed.append(f"seed {seed} {what}")
    return failed


def collect(plan: Plan, studies: dict[str, Any]) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], int]:
    """Per (study, arm): the summaries of its finished runs, one per seed (every study, not only
    the selected ones: runs of earlier sittings are reported too); and the bucket size."""
    from study_collect import read_scalars, summarize_run

    all_plan = make_plan(studies, list(studies), recipe=plan.recipe, base_overrides=plan.base_overrides,
                         out=plan.out, seeds=plan.seeds, nproc=plan.nproc)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    bucket = 1
    for run in all_plan.runs:
        bucket = int(run.settings["trainer.position_bucket_size"])
        for seed in plan.seeds:
            d = run_dir(all_plan, run, seed)
            if not is_done(d, run.key):
                continue
            start = read_scalars(sft_dir(all_plan, seed) / "tensorboard")
            summary = summarize_run(read_scalars(d / "tensorboard"), start, bucket)
            summary["seed"] = seed
            summary["run"] = run.key
            for member in run.members:
                results.setdefault(member, []).append(summary)
    return results, bucket


def _rm_metrics(plan: Plan, seed: int) -> dict[str, Any] | None:
    path = rm_dir(plan, seed) / "metrics.json"
    return json.loads(path.read_text()) if is_done(rm_dir(plan, seed), plan.rm_key) and path.is_file() else None


def _seconds(directory: Path) -> float | None:
    """Wall time a finished stage took (DONE.json), None if unknown."""
    try:
        return float(json.loads((directory / DONE).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compute_text(plan: Plan, studies: dict[str, Any]) -> str:
    """Wall time of the finished stages: per study (its SFT / reward-model stages and distinct runs,
    over the seeds) and for everything; the 2-core machine's load while they ran is not controlled."""
    all_plan = make_plan(studies, list(studies), recipe=plan.recipe, base_overrides=plan.base_overrides,
                         out=plan.out, seeds=plan.seeds, nproc=plan.nproc)

    def total(runs: list[UniqueRun]) -> tuple[float, int, int]:
        p = all_plan
        dirs = [(sft_dir(p, s), p.sft_key) for s in p.seeds]
        dirs += [(rm_dir(p, s), p.rm_key) for s in p.seeds] if any(r.reward_model for r in runs) else []
        dirs += [(run_dir(p, r, s), r.key) for s in p.seeds for r in runs]
        done = [_seconds(d) for d, key in dirs if is_done(d, key)]
        return sum(t for t in done if t is not None), len(done), len(dirs)

    lines = ["| study | stages finished | wall time of the finished stages |", "|---|---|---|"]
    for name in studies:            # a study's runs: those with one of its arms among their members
        t, n, of = total([r for r in all_plan.runs if any(s == name for s, _ in r.members)])
        lines.append(f"| {name} | {n}/{of} | {_hms(t)} |")
    t, n, of = total(all_plan.runs)
    lines.append(f"| all studies (shared stages once) | {n}/{of} | {_hms(t)} |")
    return "\n".join(lines)


def per_seed_text(plan: Plan, studies: dict[str, Any], results: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    """Every finished stage, seed by seed: the shared SFT policy and reward model, then each run."""
    from study_collect import final_eval, read_scalars, summarize_run
    from study_report import avg_name, pass_name

    all_plan = make_plan(studies, list(studies), recipe=plan.recipe, base_overrides=plan.base_overrides,
                         out=plan.out, seeds=plan.seeds, nproc=plan.nproc)
    lines = ["| seed | SFT policy: held-out greedy / sampled evaluation | reward model: held-out AUC, samples "
             "correct | wall time SFT / reward model |", "|---|---|---|---|"]
    for seed in plan.seeds:
        if not is_done(sft_dir(all_plan, seed), all_plan.sft_key):
            lines.append(f"| {seed} | not run | not run | - |")
            continue
        sft = summarize_run(read_scalars(sft_dir(all_plan, seed) / "tensorboard"))
        evals = ", ".join(f"{k} {v['values'][-1]:.3f}" for k, v in sorted(sft["eval"].items()))
        rm = _rm_metrics(all_plan, seed)
        rm_text = f"{rm['eval_auc']:.3f}, {rm['eval_accuracy']:.3f}" if rm else "not run"
        times = " / ".join(_hms(t) if (t := _seconds(d)) is not None else "-"
                           for d in (sft_dir(all_plan, seed), rm_dir(all_plan, seed)))
        lines.append(f"| {seed} | greedy {sft.get('greedy', {}).get('after', float('nan')):.3f}; {evals} | {rm_text} "
                     f"| {times} |")
    rows = {}
    for (study, arm), runs in results.items():
        for r in runs:
            rows.setdefault((r["seed"], r["run"]), (r, []))[1].append(f"{study}: {arm}")
    everything = [r for runs in results.values() for r in runs]
    if not everything:
        return "\n".join(lines + ["", "No finished arm runs."])
    avg, pas = avg_name(everything) or "avg@k", pass_name(everything) or "pass@k"
    lines += ["", f"| seed | run | arms | {avg} start → final | {pas} final | greedy before → after | "
              "length first / min / last | wall time |", "|---|---|---|---|---|---|---|---|"]
    for (seed, key), (r, names) in sorted(rows.items()):
        a, p = final_eval(r, avg) if avg else None, final_eval(r, pas) if pas else None
        g, ln = r.get("greedy"), r.get("length")
        lines.append(f"| {seed} | `{key}` | {'<br>'.join(names)} | "
                     + (f"{a[0]:.3f} → {a[1]:.3f}" if a else "-") + " | " + (f"{p[1]:.3f}" if p else "-") + " | "
                     + (f"{g['before']:.3f} → {g['after']:.3f}" if g else "-") + " | "
                     + (f"{ln['first']:.1f} / {ln['min']:.1f} / {ln['last']:.1f}" if ln else "-") + " | "
                     + (_hms(t) if (t := _seconds(seed_dir(all_plan, seed) / f"run_{key}")) is not None else "-")
                     + " |")
    return "\n".join(lines)


def shown(command: list[str]) -> str:
    """A command as the report shows it: `python`, paths relative to the repository."""
    parts = ["python" if c == sys.executable else c.replace(str(ROOT) + os.sep, "") for c in command]
    return shlex.join(parts)


def settings_text(plan: Plan, studies: dict[str, Any], argv: list[str]) -> str:
    """The exact commands and settings: base recipe + overrides, each distinct run's overrides."""
    all_plan = make_plan(studies, list(studies), recipe=plan.recipe, base_overrides=plan.base_overrides,
                         out=plan.out, seeds=plan.seeds, nproc=plan.nproc)
    rel = plan.recipe.relative_to(ROOT) if plan.recipe.is_relative_to(ROOT) else plan.recipe
    seed0 = plan.seeds[0]
    cmds = stage_commands(all_plan, seed0)
    study = (f"python tools/reproduce.py --all{task_flag(plan)} --seeds {len(plan.seeds)} --nproc {plan.nproc} --out "
             f"{shown([str(plan.out)])}" + (" --smoke" if plan.smoke else ""))
    lines = [f"Studies: `{study}` (or `--study NAME`; finished runs are skipped). This report: "
             f"`python tools/reproduce.py {shlex.join(argv)}`.", "",
             f"Base recipe: `{rel}` (with its `defaults:` file), extra overrides for every stage: "
             f"`{' '.join(plan.base_overrides) or 'none'}`. Seeds (trainer.seed): {plan.seeds}. Ranks per run: "
             f"{plan.nproc}.", "",
             f"Per seed, SFT cold start (`{seed0}` shown): `{shown(cmds['sft'])}`, then its actor checkpoint "
             f"converted to `<sft>/hf` (vcppo_megatron.checkpoint.convert_megatron_to_hf).", "",
             f"Reward model: `{shown(cmds['reward_model'])}`", "",
             "| run | arms | overrides of the base recipe |", "|---|---|---|"]
    for run in all_plan.runs:
        own = [o for o in run.overrides if o not in plan.base_overrides]
        rm = " + critic.model_path=<seed's reward model>" if run.reward_model else ""
        lines.append(f"| `{run.key}` | {'<br>'.join(f'{s}: {a}' for s, a in run.members)} | "
                     f"`{' '.join(own)}`{rm} |")
    lines += ["", f"An arm's command: `{shown(arm_command(all_plan, all_plan.runs[0], seed0))}` "
              "(the first run shown; the others differ in their overrides).", "",
              "<details><summary>Resolved base settings</summary>", "", "```"]
    base = resolved_settings(plan.recipe, plan.base_overrides)
    lines += [f"{k} = {v}" for k, v in sorted(base.items())] + ["```", "", "</details>"]
    return "\n".join(lines)


def report(plan: Plan, studies: dict[str, Any], selected: list[str], argv: list[str], path: Path) -> Any:
    """Collect the finished runs and write the report at `path`."""
    from study_report import RULE_CHANGES, write_report

    results, bucket = collect(plan, studies)
    task = str(resolved_settings(plan.recipe, plan.base_overrides)["data.task"])
    regen = (f"python tools/reproduce.py --report-only{task_flag(plan)} --out {shown([str(plan.out)])}"
             + (" --smoke" if plan.smoke else ""))
    header = ("# Reproducing the VC-PPO and VAPO ablations at small scale\n\n"
              "<!-- generated by tools/reproduce.py: do not edit by hand -->\n"
              f"Generated by `tools/reproduce.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the "
              f"finished runs under `{shown([str(plan.out)])}`{' (SMOKE settings: tests the runner, not the result)' if plan.smoke else ''}. "
              f"Regenerate from those runs with `{regen}`; run or continue the studies with "
              f"`python tools/reproduce.py --all{task_flag(plan)}` (finished runs are skipped).\n\n"
              f"Task: `{task}` ({TASKS.get(task, 'data/synthetic.py')}), on a tiny Qwen2-style model trained from "
              "scratch (SFT cold start) on a 2-core CPU. Accuracy is on held-out problems: avg@n (pass@1 estimated "
              "with n samples at temperature 1) and pass@k, at step 0 (the SFT policy) and after RL; "
              "± is the sample standard deviation over seeds." + task_note(task))
    return write_report(path, studies=list(studies.values()), selected=selected, results=results,
                        seeds=len(plan.seeds), header=header, settings=settings_text(plan, studies, argv),
                        per_seed=per_seed_text(plan, studies, results), compute=compute_text(plan, studies),
                        bucket_size=bucket,
                        rules_note=RULE_CHANGES if plan.task == DEFAULT_TASK else
                        "These rules were fixed before any run of this task (docs/REPRODUCTION.md tells how they came "
                        "to be).")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the pending stages, write the report; exit 1 if a stage failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", action="append", choices=STUDY_NAMES, default=[], help="a study to run (repeatable)")
    parser.add_argument("--all", action="store_true", help="every study")
    parser.add_argument("--arm", action="append", default=[],
                        help="only this arm of the selected studies (repeatable; the name as in the report's tables)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per arm (default 3; 1 with --smoke; --report-only: every seed found under --out)")
    parser.add_argument("--out", type=Path, default=None,
                        help="runs directory (default runs/reproduce; a new temporary directory with --smoke)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks per training run (default 2; 1 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, report in the output directory")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs only")
    parser.add_argument("--task", choices=sorted(TASK_OVERRIDES), default=DEFAULT_TASK,
                        help="the task every stage runs (default chain_sums; chain_sums_graded: its own runs "
                             "directory and report, docs/REPRODUCTION_chain_sums_graded.md)")
    parser.add_argument("--recipe", type=Path, default=BASE_RECIPE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = list(STUDY_NAMES) if args.all else list(dict.fromkeys(args.study))
    if not names and not args.report_only:
        parser.error("expected --study NAME (repeatable) or --all")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: expected >= 1")
    nproc = args.nproc if args.nproc is not None else (1 if args.smoke else 2)
    if nproc < 1:
        parser.error(f"--nproc {nproc}: expected >= 1")
    if args.smoke and args.task != DEFAULT_TASK:
        parser.error(f"--task {args.task} with --smoke: the smoke test runs its own tiny task (data.task=sums)")
    from vcppo_megatron.config import load_config

    base_overrides = SMOKE_OVERRIDES if args.smoke else TASK_OVERRIDES[args.task]
    out = args.out or (Path(tempfile.mkdtemp(prefix="reproduce-smoke-")) if args.smoke else
                       ROOT / "runs" / f"reproduce{task_suffix(args.task)}")
    out = out.resolve()
    base = load_config(args.recipe, list(base_overrides))
    seeds = [base.trainer.seed + i for i in range(args.seeds or (1 if args.smoke else 3))]
    if args.report_only and args.seeds is None:           # report every seed the runs directory has
        found = sorted(int(p.name[5:]) for p in out.glob("seed_*") if p.name[5:].isdigit())
        seeds = found or seeds
    studies = build_studies(base)
    known = {a.name for n in names for a in studies[n].arms}
    unknown = [a for a in args.arm if a not in known]
    if unknown:
        parser.error(f"--arm {', '.join(map(repr, unknown))}: not an arm of {', '.join(names) or 'the selected studies'}; "
                     f"expected one of {', '.join(sorted(known))}")
    plan = replace(make_plan(studies, names, recipe=args.recipe.resolve(), base_overrides=tuple(base_overrides),
                             out=out, seeds=seeds, nproc=nproc, arms=args.arm or None),
                   task=args.task, smoke=args.smoke)
    failed = [] if args.report_only else execute(plan)
    path = (out / "REPRODUCTION.md" if args.smoke else
            ROOT / "docs" / f"REPRODUCTION{task_suffix(args.task)}.md")
    verdicts = report(plan, studies, names, argv, path)
    print(f"== report: {path}")
    for c in verdicts:
        print(f"   {c.verdict:15s} {c.title}")
    if failed:
        print(f"== {len(failed)} stage(s) failed: {', '.join(failed)} (logs under {out / 'logs'})", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
