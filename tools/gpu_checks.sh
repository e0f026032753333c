#!/usr/bin/env bash
# Every GPU check and benchmark of this project in one go, on one GPU (H100 80GB or H200), in
# about 8 minutes (estimated from the CPU runs and the 2026-11-22 H100 figures; not yet measured
# as a whole) and never past GPU_CHECKS_BUDGET_S (default 540 s): a step that could run past it is
# skipped and marked so. Steps, in this order (issue 14's checks first):
#   deps             what is importable: torch + CUDA, triton, transformers, safetensors, tensorboard,
#                    megatron-core 0.16.1, math-verify, einops, psutil, pillow; Transformer Engine and
#                    vLLM optional (their checks skip, saying so)
#   i14_te           item 1: TE layer spec on CUDA, HF weights in through the name map, logits (log-probs
#                    and entropy) vs HF, sync buckets == HF state dict   tests/unit/test_cuda_te.py
#   i14_colocation   items 2, 5: memory per phase vs the timeline with real bf16 engines and a stand-in
#                    vLLM; vLLM starts / wakes only after release + empty cache; KV cache sized from
#                    this GPU                                            tests/unit/test_cuda_colocation.py
#   i14_launch       items 3, 4: an srun task with only SLURM_* set: exported RANK/LOCAL_RANK/...,
#                    nccl + gloo groups, engines on cuda:LOCAL_RANK, external-launcher decision
#                                                                        tests/unit/test_cuda_launch.py
#   i14_stage        item 6: the last of 2 pipeline stages built and computing on CUDA vs HF
#                                                                        tests/unit/test_cuda_stage.py
#   i14_data_path    items 12-14: one real RL step, per-token tensors on the GPU from the forward
#                    passes to the losses, GAE on Triton; no host sync in the log-prob head
#                                                                        tests/unit/test_cuda_data_path.py
#   i14_ddp_overlap  item 15: overlapped grad reduce / param gather on NCCL == plain run
#                                                                        tests/unit/test_cuda_overlap.py
#   gpu_tests        every other `gpu`-marked test: the engine vs HF on CUDA, optimizer-state offload,
#                    the sync's gather from a CUDA model, the Triton GAE kernels, 0.5B / 1.5B shapes
#                    training at 16k tokens
#   bench_gae, bench_train_0.5b, bench_train_1.5b, bench_sync: the benchmarks whose rows
#                    docs/PERFORMANCE.md keeps for this machine (issues 3, 4, 5)
# Each step's log goes to $GPU_CHECKS_OUT/<step>.log (default gpu_checks_out/); a table of steps,
# issue-14 items, exit codes, pytest counts and times comes last (also in summary.txt).
#
#   bash tools/gpu_checks.sh [STEP ...]             # all steps, or only those named (deps always runs)
#   bash tools/gpu_checks.sh --fetch-wheels DIR     # on a machine with PyPI: the cp312 wheels the GPU
#                                                   # machine lacks (megatron-core and the others above;
#                                                   # ~10 MB; gpu_wheels/ is ignored by git)
#   GPU_CHECKS_WHEELS=DIR bash tools/gpu_checks.sh  # first unpack DIR's wheels whose module is not
#                                                   # importable here into $GPU_CHECKS_SITE (default
#                                                   # /tmp/vcppo_gpu_checks_site), put that on PYTHONPATH
# Needs torch with CUDA, triton, transformers, safetensors, tensorboard and pytest. On a lent GPU
# machine whose results come back from $OUT:  GPU_CHECKS_OUT=$OUT/gpu_checks GPU_CHECKS_WHEELS=gpu_wheels \
#   bash tools/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
WHEELS=(megatron-core==0.16.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
        einops==0.8.2 psutil==7.2.2 pillow==13.0.0)

if [[ ${1:-} == --fetch-wheels ]]; then
    dir=${2:?usage: gpu_checks.sh --fetch-wheels DIR}
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "${WHEELS[@]}"
fi

OUT=${GPU_CHECKS_OUT:-gpu_checks_out}
BUDGET=${GPU_CHECKS_BUDGET_S:-540}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
START=$(date +%s)
WANTED=("$@")

if [[ -n ${GPU_CHECKS_WHEELS:-} ]]; then         # unpack what is missing (a wheel is a zip archive)
    SITE=${GPU_CHECKS_SITE:-${TMPDIR:-/tmp}/vcppo_gpu_checks_site}
    "$PY" - "$GPU_CHECKS_WHEELS" "$SITE" <<'EOF' || exit 1
import importlib.util, pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for wheel in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith((".dist-info", ".libs", ".data"))}
        mods = sorted({t[:-3] if t.endswith(".py") else t for t in tops if "." not in t or t.endswith(".py")})
        missing = [m for m in mods if importlib.util.find_spec(m) is None]
        if missing:
            z.extractall(dst)
        print(f"{wheel.name}: {'unpacked for ' + ', '.join(missing) if missing else 'already importable'}")
EOF
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

wanted() {                   # wanted NAME: no step named on the command line, or NAME among them
    [[ ${#WANTED[@]} -eq 0 ]] && return 0
    local w
    for w in "${WANTED[@]}"; do [[ $w == "$1" ]] && return 0; done
    return 1
}

step() {                     # step NAME ITEMS LIMIT_S COMMAND...: run under a time limit, keep the log
    local name=$1 items=$2 limit=$3 start rc counts
    shift 3
    wanted "$name" || [[ $name == deps ]] || return 0
    if (( $(date +%s) - START + limit > BUDGET )); then
        printf '| %-16s | %-9s | %-9s | %-34s | %5ss | %s |\n' "$name" "$items" "skipped" \
            "over GPU_CHECKS_BUDGET_S=$BUDGET" 0 "-" | tee -a "$OUT/summary.txt"
        return 0
    fi
    echo "== $name (items $items, limit ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    counts=$(grep -E '(passed|failed|skipped|error|deselected|no tests ran).* in [0-9.]+s' "$OUT/$name.log" \
             | tail -n 1 | sed -E 's/^=+ //; s/ in [0-9.]+s.*//; s/,? [0-9]+ warnings?//' | cut -c1-34)
    [[ $rc -eq 124 || $rc -eq 137 ]] && counts="timed out after ${limit}s"
    printf '| %-16s | %-9s | exit %-4s | %-34s | %5ss | %s |\n' "$name" "$items" "$rc" "${counts:--}" \
        "$(($(date +%s) - start))" "$OUT/$name.log" | tee -a "$OUT/summary.txt"
}

PYTEST=("$PY" -m pytest -m gpu -q -rs -p no:cacheprovider)
I14=(tests/unit/test_cuda_te.py tests/unit/test_cuda_colocation.py tests/unit/test_cuda_launch.py
     tests/unit/test_cuda_stage.py tests/unit/test_cuda_data_path.py tests/unit/test_cuda_overlap.py)

step deps - 60 "$PY" - <<'EOF'
import importlib, sys
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name()}, "
      f"{torch.cuda.mem_get_info()[1] / 2**30:.1f} GiB")
missing = []
for name, required in (("triton", 1), ("transformers", 1), ("safetensors", 1), ("tensorboard", 1), ("pytest", 1),
                       ("megatron.core", 1), ("math_verify", 1), ("einops", 1), ("psutil", 1), ("PIL", 1),
                       ("transformer_engine", 0), ("vllm", 0)):
    try:
        mod = importlib.import_module(name)
        print(f"{name:20s} {getattr(mod, '__version__', '?')}")
    except Exception as err:                      # noqa: BLE001 (any import failure is reported)
        print(f"{name:20s} MISSING ({'required' if required else 'optional: its checks skip'}): {err}")
        missing += [name] if required else []
sys.exit(f"missing: {missing} (GPU_CHECKS_WHEELS, see the header)" if missing else 0)
EOF
step i14_te          1       150 "${PYTEST[@]}" tests/unit/test_cuda_te.py
step i14_colocation  2,5     150 "${PYTEST[@]}" tests/unit/test_cuda_colocation.py
step i14_launch      3,4     120 "${PYTEST[@]}" tests/unit/test_cuda_launch.py
step i14_stage       6       120 "${PYTEST[@]}" tests/unit/test_cuda_stage.py
step i14_data_path   12-14   180 "${PYTEST[@]}" tests/unit/test_cuda_data_path.py
step i14_ddp_overlap 15      120 "${PYTEST[@]}" tests/unit/test_cuda_overlap.py
step gpu_tests       -       300 "${PYTEST[@]}" "${I14[@]/#/--ignore=}" tests
step bench_gae       -       120 "$PY" tools/bench_gae.py --device cuda --batch 8192 --seq 16384 --repeats 20
for shape in qwen2.5-0.5b qwen2.5-1.5b; do
    step "bench_train_${shape#qwen2.5-}" - 180 "$PY" tools/bench_train.py --device cuda --shape "$shape" \
        --seq 16384 --rows 1 --lengths full --dtype bfloat16 --head-tokens 16384 --max-tokens-per-micro-batch 16384
done
step bench_sync      -       120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 tools/bench_sync.py \
    --megatron-only --dtype bfloat16 --buckets-mib 16 64 256 --hidden 1536 --layers 28 --heads 12 --kv-heads 2 --ffn 8960
echo
echo "total $(($(date +%s) - START)) s of a ${BUDGET} s budget"
printf '| %-16s | %-9s | %-9s | %-34s | %6s | %s |\n' step items exit pytest time log
cat "$OUT/summary.txt"
! grep -qE '\| exit [1-9]' "$OUT/summary.txt"
