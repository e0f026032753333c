"""tools/reproduce.py and its modules without training: the arm table (every override valid, each
VAPO "w/o" arm differs from VAPO in exactly its technique's fields), deduplication, skip detection,
the runner's stage order / skip / failure handling with a fake trainer, and the report (tables,
verdicts, figures) from synthetic TensorBoard data."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import reproduce  # noqa: E402
import study_arms  # noqa: E402
import study_collect  # noqa: E402
import study_report  # noqa: E402
from vcppo_megatron.config import load_config  # noqa: E402

RECIPE = study_arms.BASE_RECIPE
REAL_STAGE_COMMANDS, REAL_ARM_COMMAND = reproduce.stage_commands, reproduce.arm_command   # before fake_runner


@pytest.fixture(scope="module")
def studies():
    return study_arms.build_studies(load_config(RECIPE))


@pytest.fixture(scope="module")
def plan(studies, tmp_path_factory):
    return reproduce.make_plan(studies, list(studies), recipe=RECIPE, base_overrides=(),
                               out=tmp_path_factory.mktemp("plan"), seeds=[1234], nproc=2)


def _diff(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def test_every_arm_resolves_and_the_tables_have_the_papers_rows(studies):
    assert [len(studies[n].arms) for n in study_arms.STUDY_NAMES] == [4, 3, 4, 9]
    for study in studies.values():
        assert set(study.paper_values) == {a.name for a in study.arms}, study.name
        for arm in study.arms:
            cfg = load_config(RECIPE, list(arm.overrides))          # raises on a bad override
            assert (cfg.critic.init_from == "reward_model") == arm.reward_model, arm.name
    t3 = [load_config(RECIPE, list(a.overrides)).trainer.value_pretrain_steps for a in studies["vcppo-table3"].arms]
    base_vp = load_config(RECIPE).trainer.value_pretrain_steps
    assert t3 == [round(0.5 * base_vp), base_vp, round(1.5 * base_vp)]
    ppo = load_config(RECIPE, list(studies["vcppo-table2"].arms[1].overrides))
    assert (ppo.algo.lam_actor, ppo.algo.lam_critic, ppo.trainer.value_pretrain_steps) == (0.95, 0.95, 0)


def test_each_vapo_ablation_reverts_exactly_its_technique(studies):
    arms = {a.name: a for a in studies["vapo-table1"].arms}
    vapo = study_arms.resolved_settings(RECIPE, arms["VAPO"].overrides)
    base = study_arms.resolved_settings(RECIPE, ())
    assert _diff(vapo, base) == {"critic.init_from", "algo.length_adaptive_alpha", "algo.eps_high",
                                 "algo.loss_agg_mode", "algo.nll_coef"}
    want = {"Value-Pretraining": {"trainer.value_pretrain_steps"}, "Decoupled-GAE": {"algo.lam_critic"},
            "Length-adaptive GAE": {"algo.length_adaptive_alpha"}, "Clip-Higher": {"algo.eps_high"},
            "Token-level Loss": {"algo.loss_agg_mode"}, "Positive Example LM Loss": {"algo.nll_coef"},
            "Group-Sampling": {"batch.global_prompts_per_step", "batch.samples_per_prompt"}}
    for tech, fields in want.items():
        got = study_arms.resolved_settings(RECIPE, arms[f"VAPO w/o {tech}"].overrides)
        assert _diff(got, vapo) == fields, tech
    group = study_arms.resolved_settings(RECIPE, arms["VAPO w/o Group-Sampling"].overrides)
    assert (group["batch.global_prompts_per_step"] * group["batch.samples_per_prompt"]
            == vapo["batch.global_prompts_per_step"] * vapo["batch.samples_per_prompt"])


def test_identical_settings_run_once(plan):
    members = {tuple(r.members) for r in plan.runs}
    assert len(plan.runs) == 16
    assert (("vcppo-table2", "VC-PPO"), ("vcppo-table3", "value pretraining 30 steps (1x)"),
            ("vcppo-table4", "λ_actor = 0.95")) in members
    assert (("vcppo-table2", "VC-PPO w/o Decoupled-GAE"), ("vcppo-table4", "λ_actor = 1.0")) in members
    assert (("vcppo-table2", "PPO"), ("vapo-table1", "Vanilla PPO")) in members
    assert len({r.key for r in plan.runs}) == 16


def test_arm_selection_keeps_the_named_arms_runs_with_their_keys(studies, plan, tmp_path):
    some = reproduce.make_plan(studies, ["vapo-table1"], recipe=RECIPE, base_overrides=(), out=tmp_path,
                               seeds=[1234], nproc=2, arms=["VAPO", "Vanilla PPO"])
    assert [r.members for r in some.runs] == [[("vapo-table1", "VAPO")], [("vapo-table1", "Vanilla PPO")]]
    full = {tuple(m for m in r.members if m[0] == "vapo-table1"): r.key for r in plan.runs}
    assert [r.key for r in some.runs] == [full[(("vapo-table1", "VAPO"),)], full[(("vapo-table1", "Vanilla PPO"),)]]
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), "--study", "vcppo-table2", "--arm",
                          "VAPO"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--arm 'VAPO': not an arm of vcppo-table2; expected one of GRPO," in bad.stderr


def test_keys_follow_the_settings_and_the_stages_they_build_on(studies, plan, tmp_path):
    again = reproduce.make_plan(studies, list(studies), recipe=RECIPE, base_overrides=(), out=tmp_path,
                                seeds=[1234], nproc=2)
    assert [r.key for r in again.runs] == [r.key for r in plan.runs] and again.sft_key == plan.sft_key
    longer_sft = reproduce.make_plan(studies, list(studies), recipe=RECIPE, base_overrides=("trainer.sft_steps=7",),
                                     out=tmp_path, seeds=[1234], nproc=2)
    assert longer_sft.sft_key != plan.sft_key
    assert not {r.key for r in longer_sft.runs} & {r.key for r in plan.runs}     # every arm builds on the SFT
    rm_only = reproduce.make_plan(studies, list(studies), recipe=RECIPE, base_overrides=("reward_model.epochs=3",),
                                  out=tmp_path, seeds=[1234], nproc=2)
    changed = {tuple(r.members) for r in rm_only.runs} - {tuple(r.members) for r in rm_only.runs
                                                           if r.key in {p.key for p in plan.runs}}
    assert changed == {tuple(r.members) for r in plan.runs if r.reward_model}


def test_done_marker_needs_the_same_key(tmp_path):
    assert not reproduce.is_done(tmp_path, "abc")
    reproduce.mark_done(tmp_path, "abc", command="x")
    assert reproduce.is_done(tmp_path, "abc") and not reproduce.is_done(tmp_path, "abd")
    (tmp_path / reproduce.DONE).write_text("{truncated")
    assert not reproduce.is_done(tmp_path, "abc")


# ---- a fake trainer: writes TensorBoard events like the real one ---------------------------------
FAKE = r'''
import os, sys, time
from pathlib import Path
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
out = Path(sys.argv[1]); kind = sys.argv[2]
if os.environ.get("FAKE_FAIL") == kind: sys.exit(5)
(out / "tensorboard").mkdir(parents=True, exist_ok=True)
w = EventFileWriter(str(out / "tensorboard"))
def add(tag, value, step):
    w.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])))
if kind == "sft":
    add("eval/synthetic_eval/avg@4", 0.3, 0); add("eval/synthetic_eval/pass@4", 0.5, 0)
elif kind == "arm":
    for s in range(4):
        add("rl/response_length/mean", 120 - 10 * s, s)
        for b in range(3):
            add(f"rl/position/advantages/bucket_{b:02d}", 0.3 - 0.2 * b, s)
    add("eval/synthetic_eval/avg@4", 0.35, 4); add("eval/synthetic_eval/pass@4", 0.6, 4)
    add("eval/accuracy", 0.3, 0); add("eval/accuracy", 0.31, 2); add("eval/accuracy", 0.32, 4)
w.close()
'''


@pytest.fixture
def fake_runner(tmp_path, monkeypatch, studies):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    calls: list[str] = []

    def fake_stage(plan, seed):
        return {"sft": [sys.executable, str(script), str(reproduce.sft_dir(plan, seed)), "sft"],
                "reward_model": [sys.executable, str(script), str(reproduce.rm_dir(plan, seed)), "rm"]}

    def fake_arm(plan, run, seed):
        return [sys.executable, str(script), str(reproduce.run_dir(plan, run, seed)), "arm"]

    monkeypatch.setattr(reproduce, "stage_commands", fake_stage)
    monkeypatch.setattr(reproduce, "arm_command", fake_arm)
    monkeypatch.setattr(reproduce, "_convert_sft", lambda d: calls.append(f"convert {d.name}"))
    plan = reproduce.make_plan(studies, ["vcppo-table2"], recipe=RECIPE, base_overrides=(), out=tmp_path / "out",
                               seeds=[1234, 1235], nproc=2)
    return plan, calls


def test_runner_runs_each_stage_once_and_skips_finished_ones(fake_runner, capsys, monkeypatch):
    plan, calls = fake_runner
    assert reproduce.execute(plan) == []
    log = capsys.readouterr().out
    assert "4 distinct arm runs x 2 seeds" in log and "12 to run, 0 finished before" in log
    order = [line.split(": ")[0].split("] ")[1] for line in log.splitlines() if line.endswith("running") or "running  " in line]
    assert order[:3] == ["seed 1234 SFT cold start", "seed 1234 reward model", "seed 1234 vcppo-table2/GRPO"]
    assert "[reproduce 12/12]" in log and "ETA" in log
    assert calls == [f"convert sft_{plan.sft_key}"] * 2                      # the SFT policy converted per seed
    for seed in plan.seeds:
        assert all(reproduce.is_done(reproduce.run_dir(plan, r, seed), r.key) for r in plan.runs)
    assert reproduce.execute(plan) == []
    assert "0 to run, 12 finished before (skipped)" in capsys.readouterr().out


def test_runner_reports_a_failed_stage_and_skips_what_depends_on_it(fake_runner, capsys, monkeypatch):
    plan, _ = fake_runner
    monkeypatch.setenv("FAKE_FAIL", "rm")
    failed = reproduce.execute(plan)
    log = capsys.readouterr().out
    # PPO needs the reward model: it is skipped, the other arms run
    assert failed == ["seed 1234 reward model", "seed 1234 PPO", "seed 1235 reward model", "seed 1235 PPO"], failed
    assert "exit code 5" in log and "FAILED" in log
    monkeypatch.delenv("FAKE_FAIL")
    assert reproduce.execute(plan) == []
    assert "4 to run, 8 finished before" in capsys.readouterr().out


def test_report_from_fake_runs_has_every_arm_and_a_verdict_per_claim(fake_runner, studies, tmp_path):
    plan, _ = fake_runner
    reproduce.execute(plan)
    path = tmp_path / "REPRODUCTION.md"                 # its figures: reproduction/ beside it
    verdicts = reproduce.report(plan, studies, ["vcppo-table2"], ["--study", "vcppo-table2"], path)
    text = path.read_text()
    assert text.count("**Verdict: ") == len(verdicts) == 7
    for study in studies.values():
        for arm in study.arms:
            assert f"| {arm.name} |" in text, arm.name
    assert "| λ_actor = 0.9 | 0/2 (NOT RUN)" in text and "| λ_actor = 0.95 | 2/2 |" in text   # shared run
    assert "0.300 ± 0.000 | 0.350 ± 0.000 |" in text      # start = SFT eval
    # PPO's fake length falls 120 -> 90 and avg@4 gains 0.05 (> 0.02): shortened but improved
    first = next(c for c in verdicts if c.title.startswith("Baseline PPO"))
    assert first.verdict == study_report.NOT_REPRODUCED and "PPO improved by +0.050" in first.reading
    assert next(c for c in verdicts if "biased by token position" in c.title).verdict == study_report.REPRODUCED
    figs = sorted(p.name for p in (tmp_path / "reproduction").iterdir())
    assert "vcppo-table2_length.png" in figs and "vcppo-table2_position.png" in figs
    assert "vcppo-table2_greedy.png" in figs                    # greedy accuracy over steps
    assert all((tmp_path / "reproduction" / f).stat().st_size > 1000 for f in figs)


def test_graded_task_runs_apart_and_reports_apart(fake_runner, studies, tmp_path, capsys):
    """--task chain_sums_graded: every stage runs the task's overrides, under keys of its own (its
    runs never mix with chain_sums's), and the report names the task, the command that addresses
    its runs, and draws its figures beside itself, not into docs/reproduction/."""
    overrides = study_arms.TASK_OVERRIDES["chain_sums_graded"]
    default, _ = fake_runner
    graded = reproduce.replace(reproduce.make_plan(studies, ["vcppo-table2"], recipe=RECIPE, base_overrides=overrides,
                                                   out=tmp_path / "graded", seeds=[1234], nproc=2),
                               task="chain_sums_graded")
    assert graded.sft_key != default.sft_key and graded.rm_key != default.rm_key
    assert not {r.key for r in graded.runs} & {r.key for r in default.runs}
    assert all(r.settings["data.task"] == "chain_sums_graded" for r in graded.runs)
    assert all(r.settings["rollout.max_prompt_tokens"] == 38 for r in graded.runs)
    assert all(r.settings["trainer.sft_steps"] == 0 for r in graded.runs)            # arms start from the SFT policy
    sft = study_arms.resolved_settings(RECIPE, overrides + reproduce.SFT_ONLY)
    assert sft["trainer.sft_steps"] == 2400 and sft["data.task"] == "chain_sums_graded"
    cmds = [*REAL_STAGE_COMMANDS(graded, 1234).values(), *(REAL_ARM_COMMAND(graded, r, 1234) for r in graded.runs)]
    assert all(set(overrides) <= set(c) for c in cmds)
    reproduce.execute(graded)
    capsys.readouterr()
    path = tmp_path / "docs" / "REPRODUCTION_chain_sums_graded.md"
    reproduce.report(graded, studies, ["vcppo-table2"], ["--study", "vcppo-table2"], path)
    text = path.read_text()
    assert "Task: `chain_sums_graded`" in text and "pace tag" in text
    assert "--report-only --task chain_sums_graded --out" in text and "--all --task chain_sums_graded" in text
    assert study_report.RULE_CHANGES not in text and "fixed before any run of this task" in text
    figs = tmp_path / "docs" / "reproduction_chain_sums_graded"
    assert (figs / "vcppo-table2_length.png").exists() and not (tmp_path / "docs" / "reproduction").exists()
    assert "](reproduction_chain_sums_graded/vcppo-table2_length.png)" in text


def test_graded_task_has_no_smoke_mode():
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--study", "vcppo-table2", "--smoke", "--task", "chain_sums_graded"])
    assert e.value.code == 2


# ---- verdict rules on synthetic summaries -------------------------------------------------------
def _summary(lengths, avg, start=0.3, adv=(0.0, 0.0, 0.0), vloss=None, reached=None, values=()) -> dict:
    s = {"length": {"steps": list(range(len(lengths))), "values": lengths, "first": lengths[0],
                    "min": min(lengths), "last": lengths[-1]},
         "eval": {"avg@4": {"steps": [0, 10], "values": [start, avg]}},
         "position": {"advantages": list(adv), "values": list(values), "returns": [], "reached": reached}}
    if vloss is not None:
        s["value_pretrain"] = {"steps": list(range(len(vloss))), "value_loss": vloss, "explained_variance": []}
    return s


def test_claims_follow_the_rules():
    two_stage_loss = [1.0, 0.5, 0.3, 0.25, 0.24, 0.23, 0.22, 0.21, 0.20, 0.19, 0.18, 0.17]
    results = {
        ("vcppo-table2", "PPO"): [_summary([150, 90, 60], 0.29, adv=(0.5, 0.1, -0.4)),
                                  _summary([140, 100, 70], 0.31, adv=(0.4, 0.0, -0.3))],
        ("vcppo-table2", "VC-PPO"): [_summary([150, 150, 155], 0.5, adv=(0.0, 0.01, 0.0), vloss=two_stage_loss),
                                     _summary([150, 152, 150], 0.52, adv=(0.01, 0.0, 0.0), vloss=two_stage_loss)],
        ("vcppo-table2", "VC-PPO w/o Decoupled-GAE"): [_summary([150, 150, 150], 0.49),
                                                       _summary([150, 150, 150], 0.53)],
    }
    c = {x.title.split(":")[0][:20]: x for x in study_report.claims(results)}
    assert c["Baseline PPO shorten"].verdict == study_report.REPRODUCED
    assert c["PPO's advantages are"].verdict == study_report.REPRODUCED
    assert c["Value pretraining re"].verdict == study_report.REPRODUCED, c["Value pretraining re"].numbers
    # 0.51 vs 0.51: no difference beyond the spread
    assert c["Decoupled GAE (λ_cri"].verdict == study_report.NOT_REPRODUCED
    assert c["Every λ_actor < 1 be"].verdict == study_report.NOT_RUN
    assert c["Each of VAPO's seven"].verdict == study_report.NOT_RUN
    assert c["Value-pretraining le"].verdict == study_report.NOT_RUN


def test_position_bias_is_judged_over_the_buckets_every_response_fills():
    # every response fills buckets 0-2; bucket 3 holds only the longest, wrong responses: the
    # all-bucket slope is negative, the slope over the filled buckets positive (no bias of the paper's sign)
    loss = [1.0, 0.5, 0.3, 0.25, 0.24, 0.23, 0.22, 0.21]
    flat = (-0.1, -0.1, -0.1, 0.2)
    results = {
        ("vcppo-table2", "PPO"): [_summary([150, 150], 0.3, adv=(-0.1, -0.05, 0.0, -4.0), reached=3, values=flat),
                                  _summary([150, 150], 0.3, adv=(-0.12, -0.06, 0.01, -3.5), reached=3, values=flat)],
        ("vcppo-table2", "VC-PPO"): [_summary([150, 150], 0.5, adv=(0.0, 0.0, 0.0, -3.0), reached=3, vloss=loss),
                                     _summary([150, 150], 0.5, adv=(0.0, 0.0, 0.0, -3.0), reached=3, vloss=loss)],
    }
    c = {x.title[:20]: x for x in study_report.claims(results)}
    bias = c["PPO's advantages are"]
    assert bias.verdict == study_report.NOT_REPRODUCED, bias.numbers
    assert "over the 3 buckets every response fills" in bias.numbers and "slope per bucket" in bias.numbers
    assert "-0.100 -> -0.100" in bias.reading                  # the reward model's values are flat
    assert study_collect.slope([-0.1, -0.05, 0.0, -4.0]) < 0   # what the all-bucket rule would have said
    removed = c["Value pretraining re"]
    assert removed.verdict == study_report.NOT_REPRODUCED and "no bias of the paper's sign" in removed.reading
    # without the shortest length (older runs) every bucket counts, and the report says so
    for r in results[("vcppo-table2", "PPO")]:
        r["position"]["reached"] = None
    bias = next(x for x in study_report.claims(results) if x.title.startswith("PPO's advantages"))
    assert bias.verdict == study_report.REPRODUCED and "over every bucket (the runs did not log" in bias.numbers


def test_arms_are_compared_by_their_per_seed_differences():
    """The arms of a seed share the SFT policy: VC-PPO 0.05 above the coupled arm on each of 3 seeds
    whose SFT policies differ widely beats it (paired), though the unpaired spread would hide it."""
    def runs(finals, seeds=(1, 2, 3)):
        return [dict(_summary([150, 150], f, start=f - 0.1), seed=k) for k, f in zip(seeds, finals)]

    base = [0.1, 0.5, 0.9]
    results = {("vcppo-table2", "VC-PPO"): runs([b + 0.05 for b in base]),
               ("vcppo-table2", "VC-PPO w/o Decoupled-GAE"): runs(base)}
    claim = next(c for c in study_report.claims(results) if c.title.startswith("Decoupled GAE"))
    assert claim.verdict == study_report.REPRODUCED, claim.numbers
    assert "paired over 3 seeds: difference +0.050 ± 0.000" in claim.numbers
    # on different seeds the comparison is unpaired, and the spread of the SFT policies hides the gap
    results[("vcppo-table2", "VC-PPO")] = runs([b + 0.05 for b in base], seeds=(4, 5, 6))
    claim = next(c for c in study_report.claims(results) if c.title.startswith("Decoupled GAE"))
    assert claim.verdict == study_report.NOT_REPRODUCED and "unpaired: difference +0.050" in claim.numbers
    # a position slope below zero but within its standard error is not a bias
    ppo = [dict(_summary([150, 150], 0.3, adv=adv, reached=3), seed=k)
           for k, adv in ((1, (0.02, 0.0, -0.01)), (2, (-0.02, 0.0, 0.01)), (3, (0.0, 0.0, -0.005)))]
    bias = next(c for c in study_report.claims({("vcppo-table2", "PPO"): ppo}) if c.title.startswith("PPO's adv"))
    assert bias.verdict == study_report.NOT_REPRODUCED and "by more than its standard error" in bias.numbers


def test_two_stage_and_spread_helpers():
    assert study_report.two_stage([1.0, 0.5, 0.3, 0.25, 0.24, 0.23, 0.22, 0.21])[0]
    assert not study_report.two_stage([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])[0]     # one straight line
    assert not study_report.two_stage([1.0, 0.5, 0.4])[0]
    m, s = study_collect.mean_spread([1.0, 2.0, 3.0, math.nan])
    assert (m, s) == (2.0, 1.0)
    assert study_collect.slope([3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_summary_reads_tensorboard_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    for s in range(7):
        w.add_scalar("rl/position/advantages/bucket_00", 1.0 + s, s)
        w.add_scalar("rl/position/advantages/bucket_01", -1.0, s)
        w.add_scalar("value_pretrain/critic/value_loss", 1.0 / (s + 1), s)
        w.add_scalar("value_pretrain/critic/explained_variance", 0.1 * s, s)
        w.add_scalar("rl/response_length/min", 40 - s if s < 5 else 3, s)    # steps 0-4: shortest 36
    w.add_scalar("eval/gsm/avg@8", 0.4, 3)
    for step, acc in ((0, 0.5), (3, 0.75), (6, 0.25)):
        w.add_scalar("eval/accuracy", acc, step)
    w.close()
    s = study_collect.summarize_run(study_collect.read_scalars(tmp_path),
                                    {"eval/gsm/avg@8": {0: 0.25}}, bucket_size=16)
    assert s["greedy"] == {"before": 0.5, "after": 0.25, "steps": [0, 3, 6], "values": [0.5, 0.75, 0.25]}
    assert s["position"]["reached"] == 2          # 36 tokens fill buckets [0, 16) and [16, 32)
    assert s["position"]["advantages"] == [pytest.approx(3.0), -1.0]       # mean of the first 5 steps
    assert s["eval"]["avg@8"] == {"steps": [0, 3], "values": [0.25, pytest.approx(0.4)]}
    assert len(s["value_pretrain"]["value_loss"]) == 7 and "length" not in s
