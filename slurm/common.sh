# shellcheck shell=bash
# Shared body of the vcppo_megatron sbatch scripts; sourced after RECIPE and REPO_DIR are set.
# srun starts one task per GPU; every task runs the same SPMD trainer. No Ray.
# Environment knobs (all optional):
#   CONTAINER_IMAGE   enroot/pyxis image (squashfs or docker://...); unset: use the venv VENV
#   CONTAINER_MOUNTS  extra pyxis mounts, "src:dst[,src:dst]" (the repo and RUN_ROOT are always mounted)
#   VENV              virtual environment to activate when no container (default: $REPO_DIR/.venv)
#   RUN_ROOT          where per-job run directories go (default: $REPO_DIR/runs)
#   RUN_DIR           reuse this run directory (resume a previous job); default RUN_ROOT/NAME-JOBID
#   GPUS_PER_NODE     tasks per node (default: SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT       rendezvous port (default: derived from the job id)
#   TRAIN_MODULE      python module to run (default: vcppo_megatron.train)
#   MAX_REQUEUES      stop requeueing after this many restarts (default: 20)
#   VLLM_CACHE_ROOT, TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, HF_HOME, XDG_CACHE_HOME, ...
#                     caches (default: under RUN_DIR/cache, not ~: see the caches block below)
set -euo pipefail

: "${RECIPE:?RECIPE must be set by the sbatch script}"
: "${REPO_DIR:?REPO_DIR must be set by the sbatch script}"
JOB_ID="${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch}"
JOB_NAME="${SLURM_JOB_NAME:-vcppo}"
NUM_NODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
TRAIN_MODULE="${TRAIN_MODULE:-vcppo_megatron.train}"
MAX_REQUEUES="${MAX_REQUEUES:-20}"
RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"

RUN_ROOT="${RUN_ROOT:-$REPO_DIR/runs}"

# ---- software: a pyxis/enroot container, or a venv ----
SRUN_ARGS=(--ntasks-per-node="$GPUS_PER_NODE" --distribution=block --kill-on-bad-exit=1 --cpu-bind=none)
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
  MOUNTS="$REPO_DIR:$REPO_DIR,$RUN_ROOT:$RUN_ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
  SRUN_ARGS+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$MOUNTS"
              --container-workdir="$REPO_DIR" --no-container-mount-home)
  PYTHON=python
else
  VENV="${VENV:-$REPO_DIR/.venv}"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "error: no container (CONTAINER_IMAGE unset) and no venv at VENV=$VENV (expected $VENV/bin/python)" >&2
    exit 2
  fi
  PYTHON="$VENV/bin/python"
fi

# ---- run directory: logs, TensorBoard and checkpoints of this job (kept across requeues) ----
RUN_DIR="${RUN_DIR:-$RUN_ROOT/$JOB_NAME-$JOB_ID}"
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tensorboard" "$RUN_DIR/checkpoints"
LOG="$RUN_DIR/logs/restart$RESTART_COUNT.log"

# ---- rendezvous: the first node of the allocation; a port every task derives the same way ----
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((20000 + JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT

# ---- NCCL / CUDA settings (override any of them in the environment before sbatch) ----
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"   # Megatron TP/SP comm-compute overlap ordering
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a failed collective kills the job instead of hanging it
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"                                   # INFO to debug topology / transport choice
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"                           # tolerate slow InfiniBand links
# NCCL_SOCKET_IFNAME (bootstrap interface, e.g. ib0 or eth0) and NCCL_IB_HCA (e.g. mlx5) are
# cluster-specific: set them in the environment if NCCL picks the wrong interface.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTHONUNBUFFERED=1
export VCPPO_RUN_DIR="$RUN_DIR"

# ---- caches: vLLM, Triton, TorchInductor, HF and the XDG roots default under ~, which a container
# started with --no-container-mount-home may leave unwritable (or gone after the job); keep them in
# the run directory (kept across requeues: compiled kernels are reused) unless already set ----
CACHE_DIR="$RUN_DIR/cache"
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$CACHE_DIR/xdg}"                  # fallback root of many tools
export XDG_CONFIG_HOME="${XDG_CONFIG_HOME:-$CACHE_DIR/xdg-config}"        # vLLM's config root reads it
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$CACHE_DIR/vllm}"              # torch.compile / CUDA-graph artefacts
export VLLM_CONFIG_ROOT="${VLLM_CONFIG_ROOT:-$CACHE_DIR/vllm-config}"
export VLLM_NO_USAGE_STATS="${VLLM_NO_USAGE_STATS:-1}"                     # no usage report (nor its file under ~)
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$CACHE_DIR/triton}"          # Triton kernels (vLLM, GAE)
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$CACHE_DIR/inductor}"
export HF_HOME="${HF_HOME:-$CACHE_DIR/hf}"                                # transformers' module cache
mkdir -p "$XDG_CACHE_HOME" "$XDG_CONFIG_HOME" "$VLLM_CACHE_ROOT" "$VLLM_CONFIG_ROOT" "$TRITON_CACHE_DIR" \
         "$TORCHINDUCTOR_CACHE_DIR" "$HF_HOME"

export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

echo "job $JOB_ID ($JOB_NAME) restart $RESTART_COUNT: $NUM_NODES nodes x $GPUS_PER_NODE tasks," \
     "master $MASTER_ADDR:$MASTER_PORT, recipe $RECIPE, run dir $RUN_DIR" | tee -a "$LOG"

# ---- checkpoint-then-requeue: sbatch --signal=B:USR1@SECONDS delivers USR1 to this shell ----
# SECONDS is the preemption margin: one step + a checkpoint + exit (tools/plan.py prints it per
# recipe; slurm/README.md gives the formula). The trainer polls the signal between steps.
EXIT_CHECKPOINTED=3          # vcppo_megatron/train.py: stopped by SIGTERM / SIGUSR1 after a checkpoint
PREEMPTED=0
# shellcheck disable=SC2329  # invoked by the trap below
on_usr1() {
  PREEMPTED=1
  echo "$(date -u +%FT%TZ) USR1: asking the trainer to checkpoint and exit" | tee -a "$LOG"
  if [[ -n "${SRUN_PID:-}" ]]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
trap on_usr1 USR1

cd "$REPO_DIR"
# The trainer resumes from the latest checkpoint under trainer.output_dir by itself.
srun "${SRUN_ARGS[@]}" "$PYTHON" -m "$TRAIN_MODULE" --config "$RECIPE" \
  trainer.output_dir="$RUN_DIR" "$@" >>"$LOG" 2>&1 &
SRUN_PID=$!
STATUS=0
while true; do
  wait "$SRUN_PID" && STATUS=0 || STATUS=$?
  # wait returns > 128 when a trapped signal interrupts it; the step is still running then
  if kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
  break
done

# Requeue when this shell forwarded USR1, or when the trainer says it stopped after writing a
# checkpoint (exit 3: SIGTERM / SIGUSR1 reached the tasks some other way, e.g. scancel --signal
# or a preemption's SIGTERM); any other status ends the job with that status.
if [[ "$PREEMPTED" == 1 || "$STATUS" == "$EXIT_CHECKPOINTED" ]]; then
  if (( RESTART_COUNT >= MAX_REQUEUES )); then
    echo "not requeueing: restart $RESTART_COUNT reached MAX_REQUEUES=$MAX_REQUEUES" | tee -a "$LOG"
    exit 1
  fi
  WHY="after USR1"
  if [[ "$PREEMPTED" != 1 ]]; then WHY="(checkpoint written, stopped by a signal)"; fi
  echo "$(date -u +%FT%TZ) trainer exited with $STATUS $WHY; requeueing job $JOB_ID" | tee -a "$LOG"
  scontrol requeue "$JOB_ID"
  exit 0
fi
echo "$(date -u +%FT%TZ) trainer exited with $STATUS" | tee -a "$LOG"
exit "$STATUS"
