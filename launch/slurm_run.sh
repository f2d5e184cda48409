#!/usr/bin/env bash
# Start the trainer on every node of a SLURM allocation with srun, as one JAX cluster.
#
# Usage (inside an allocation: from launch/slurm.sbatch, or after salloc):
#   launch/slurm_run.sh [options] [TRAINER_ARGS...]      runs PYTHON -m beta_clip_jax.main ARGS
#   launch/slurm_run.sh [options] -- COMMAND [ARGS...]   runs any command in every task
#
# Options (before the trainer arguments; the first unknown argument starts those):
#   --procs-per=gpu|node  one process per GPU (JAX's SLURM default) or one per node driving all
#                         of that node's GPUs [gpu; BETA_CLIP_PROCS_PER]
#   --gpus-per-node=G     [SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE, else nvidia-smi -L];
#                         0 for CPU-only nodes (with --procs-per=node)
#   --nodes=N             [SLURM_JOB_NUM_NODES]
#   --explicit            set BETA_CLIP_COORDINATOR/NUM_PROCESSES/PROCESS_ID from SLURM's task
#                         variables instead of relying on JAX's own SLURM detection
#   --port=PORT           coordinator port with --explicit [from the job id, as JAX does]
#   --log-dir=DIR         one log per task, DIR/JOBID.TASK.log [srun's output, lines labelled]
#   --python=PYTHON       [python3 of an activated environment,
#                         else .venv/bin/python of this checkout, else python3]
#   --srun-flag=FLAG      extra srun flag, e.g. --srun-flag=--cpu-bind=none; repeatable
#   --dry-run             print the srun command instead of running it [DRY_RUN=1]
#
# srun starts this same script with --task in every task; that sets the per-task environment
# (BETA_CLIP_LOCAL_DEVICE_IDS: which GPUs this process drives) and execs the command, in which
# beta_clip_jax.distributed.maybe_initialize() starts jax.distributed. --kill-on-bad-exit=1 ends
# all tasks when one fails. The checkout must be on a file system that all nodes share.
#
# Examples:
#   salloc --nodes=2 --gpus-per-node=8 --exclusive
#   launch/slurm_run.sh --config=configs/NAME.py --workdir=/shared/runs/r1
#   launch/slurm_run.sh --procs-per=node --dry-run --config=configs/NAME.py --workdir=/shared/r1
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TASK=0
PROCS_PER="${BETA_CLIP_PROCS_PER:-gpu}"
GPUS=""
NODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}"
EXPLICIT=0
PORT=""
LOG_DIR=""
PYTHON=""
SRUN_FLAGS=()
while (($#)); do
  case "$1" in
    --task) TASK=1 ;;
    --procs-per=*) PROCS_PER="${1#*=}" ;;
    --gpus-per-node=*) GPUS="${1#*=}" ;;
    --nodes=*) NODES="${1#*=}" ;;
    --explicit) EXPLICIT=1 ;;
    --port=*) PORT="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --srun-flag=*) SRUN_FLAGS+=("${1#*=}") ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) break ;;
  esac
  shift
done
[[ "$PROCS_PER" == gpu || "$PROCS_PER" == node ]] || die "--procs-per=$PROCS_PER: gpu or node"
PYTHON="${PYTHON:-$(default_python)}"
if [[ "${1:-}" == "--" ]]; then
  shift
  (($#)) || die "nothing after --: give the command to run"
  COMMAND=("$@")
else
  COMMAND=("$PYTHON" -m beta_clip_jax.main "$@")
fi

if ((TASK)); then
  # One srun task: say which devices it drives, then become the command.
  for name in SLURM_PROCID SLURM_LOCALID SLURM_NTASKS SLURM_JOB_ID; do
    [[ -n "${!name:-}" ]] || die "--task runs under srun; $name is not set"
  done
  vars=()
  visible="${CUDA_VISIBLE_DEVICES:-}"
  if [[ "$PROCS_PER" == gpu ]]; then
    # If SLURM already bound one GPU to this task, it is device 0 of what the task sees.
    if [[ -n "$visible" && "$visible" != *,* ]]; then
      vars+=(BETA_CLIP_LOCAL_DEVICE_IDS=0)
    else
      vars+=("BETA_CLIP_LOCAL_DEVICE_IDS=$SLURM_LOCALID")
    fi
  elif [[ "${GPUS:-0}" -gt 0 ]]; then
    # JAX's SLURM detection would give every process only GPU number SLURM_LOCALID (= 0).
    vars+=("BETA_CLIP_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS - 1)))")
  fi
  if ((EXPLICIT)); then
    nodelist="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}"
    [[ -n "$nodelist" ]] || die "--explicit needs SLURM_STEP_NODELIST or SLURM_JOB_NODELIST"
    head_node="$(scontrol show hostnames "$nodelist" | head -n 1)"
    PORT="${PORT:-$((SLURM_JOB_ID % 4096 + 61440))}"
    vars+=("BETA_CLIP_COORDINATOR=$head_node:$PORT" "BETA_CLIP_NUM_PROCESSES=$SLURM_NTASKS"
      "BETA_CLIP_PROCESS_ID=$SLURM_PROCID")
  elif [[ -n "$PORT" ]]; then
    vars+=("JAX_COORDINATOR_PORT=$PORT")
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    run env "${vars[@]}" "${COMMAND[@]}"
    exit 0
  fi
  exec env "${vars[@]}" "${COMMAND[@]}"
fi

# The launcher: one srun over the whole allocation.
[[ -n "$NODES" ]] || die "no node count: run inside an allocation or pass --nodes=N"
if [[ -z "$GPUS" ]]; then
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    GPUS="$SLURM_GPUS_ON_NODE"
  elif [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
    GPUS="${SLURM_GPUS_PER_NODE##*:}"  # "8" or "h100:8"
  elif command -v nvidia-smi >/dev/null; then
    GPUS="$(nvidia-smi -L | grep -c '^GPU' || true)"
  fi
fi
[[ "$GPUS" =~ ^[0-9]+$ ]] || die "cannot tell the GPUs per node ('$GPUS'): pass --gpus-per-node=G"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes=$NODES: a positive number"
if [[ "$PROCS_PER" == gpu ]]; then
  ((GPUS > 0)) || die "--procs-per=gpu with no GPUs; use --procs-per=node on CPU nodes"
  per_node=$GPUS
else
  per_node=1
fi

srun=(srun "--nodes=$NODES" "--ntasks=$((NODES * per_node))" "--ntasks-per-node=$per_node"
  --kill-on-bad-exit=1)
if [[ -n "${SLURM_CPUS_ON_NODE:-}" ]] && ((SLURM_CPUS_ON_NODE >= per_node)); then
  # Recent SLURM no longer passes sbatch's --cpus-per-task to srun; the input pipeline wants
  # the node's cores shared among its tasks, not one core each.
  srun+=("--cpus-per-task=$((SLURM_CPUS_ON_NODE / per_node))")
fi
if [[ -n "$LOG_DIR" ]]; then
  [[ "$DRY_RUN" == 1 ]] || mkdir -p "$LOG_DIR"
  srun+=("--output=$LOG_DIR/%j.%t.log")
else
  srun+=(--label)
fi
srun+=(${SRUN_FLAGS[@]+"${SRUN_FLAGS[@]}"})
task=("$LAUNCH_DIR/slurm_run.sh" --task "--procs-per=$PROCS_PER" "--gpus-per-node=$GPUS")
((EXPLICIT)) && task+=(--explicit)
[[ -n "$PORT" ]] && task+=("--port=$PORT")
((DRY_RUN)) && note "$NODES node(s) x $per_node process(es), $GPUS GPU(s) per node"
run "${srun[@]}" "${task[@]}" -- "${COMMAND[@]}"
