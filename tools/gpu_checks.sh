#!/usr/bin/env bash
# Every GPU check and benchmark of this project in one go, on one H100 (about 15 minutes): the
# `gpu`-marked tests, then the benchmarks whose rows docs/PERFORMANCE.md keeps for that machine
# (issue 3: fused GAE at 8192 x 16384; issue 4: Qwen2.5-0.5B / 1.5B shapes training at 16k tokens;
# issue 5: the Megatron-side gather / re-slice of the weight sync). Logs go to $GPU_CHECKS_OUT
# (default gpu_checks_out/); a table of exit codes and times comes last.
#
#   bash tools/gpu_checks.sh                 # needs torch with CUDA, triton, transformers,
#                                            # safetensors, pytest and megatron-core 0.16.1
# megatron-core is pure Python: where it is missing, install its wheel into a directory on
# PYTHONPATH (pip install --no-deps --target DIR megatron_core-0.16.1-*.whl).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECKS_OUT:-gpu_checks_out}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

step() {                     # step NAME COMMAND...: run, keep the log, print its tail and a summary row
    local name=$1 start rc
    shift
    echo "== $name: $*"
    start=$(date +%s)
    "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 30 "$OUT/$name.log"
    printf '| %-18s | exit %-3s | %5ss | %s |\n' "$name" "$rc" "$(($(date +%s) - start))" "$OUT/$name.log" \
        | tee -a "$OUT/summary.txt"
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
step gpu_tests "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
step bench_gae "$PY" tools/bench_gae.py --device cuda --batch 8192 --seq 16384 --repeats 20
for shape in qwen2.5-0.5b qwen2.5-1.5b; do
    step "bench_train_${shape#qwen2.5-}" "$PY" tools/bench_train.py --device cuda --shape "$shape" --seq 16384 \
        --rows 1 --lengths full --dtype bfloat16 --head-tokens 16384 --max-tokens-per-micro-batch 16384
done
step bench_sync "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 tools/bench_sync.py --megatron-only \
    --dtype bfloat16 --buckets-mib 16 64 256 --hidden 1536 --layers 28 --heads 12 --kv-heads 2 --ffn 8960
echo
echo "| step               | exit     | time   | log |"
cat "$OUT/summary.txt"
