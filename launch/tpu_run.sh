#!/usr/bin/env bash
# Run the same training command on every worker of a TPU VM or pod slice, in the background.
#
# Usage:
#   launch/tpu_run.sh --name=NAME --zone=ZONE [options] -- TRAINER_ARGS...
#
# TRAINER_ARGS go to `python -m beta_clip_jax.main` unchanged, on all workers alike, e.g.
#   -- --config=configs/NAME.py --workdir=gs://BUCKET/RUN --config.FIELD=VALUE
# Rerunning the same command with the same workdir resumes from its last checkpoint.
#
# Options:
#   --name=NAME, --zone=ZONE, --project=PROJECT   as for tpu_create.sh [TPU_NAME, ZONE, PROJECT_ID]
#   --run=RUN          name of this run's log on each worker: DIR/logs/RUN.log (and RUN.pid);
#                      default run-YYYYmmdd-HHMMSS
#   --module=MODULE    Python module to run [beta_clip_jax.main]
#   --remote-dir=DIR   code directory on the workers, as for tpu_setup.sh [beta_clip_jax]
#   --python=PYTHON    interpreter on the workers [python3]
#   --env=KEY=VALUE    environment variable for the job; repeatable
#   --kill-existing    stop runs this script started earlier (SIGTERM, then SIGKILL after 120 s)
#                      instead of refusing to start while one is alive
#   --follow=WORKER    after starting, stream this worker's log: a worker number, all, or none [0]
#   --dry-run          print the commands instead of running them [DRY_RUN=1]
#
# Each worker runs `setsid nohup env ... PYTHON -m MODULE ARGS > logs/RUN.log 2>&1 &`, so the job
# survives the ssh session; Ctrl-C while following only stops the streaming. Watch it later with
# launch/tpu_logs.sh, stop it (SIGTERM: checkpoint, then exit) with launch/tpu_stop.sh.
# A pod needs a workdir every worker can see: use gs://.
#
# Example:
#   launch/tpu_run.sh --name=bclip --zone=us-central2-b -- \
#       --config=configs/beta_clip_b16.py --workdir=gs://my-bucket/bclip/run1
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN="run-$(date +%Y%m%d-%H%M%S)"
MODULE="beta_clip_jax.main"
REMOTE_DIR="beta_clip_jax"
PYTHON="python3"
ENVS=()
KILL_EXISTING=0
FOLLOW=0
ARGS=()
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  case "$1" in
    --run=*) RUN="${1#*=}" ;;
    --module=*) MODULE="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --env=*=*) ENVS+=("${1#*=}") ;;
    --kill-existing) KILL_EXISTING=1 ;;
    --follow=*) FOLLOW="${1#*=}" ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "unknown argument '$1'; trainer arguments go after -- (see --help)" ;;
  esac
  shift
done
require_tpu
[[ "$RUN" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run=$RUN: use letters, digits, '.', '_' and '-'"
((${#ARGS[@]})) || die "no trainer arguments: add -- --config=configs/NAME.py --workdir=gs://..."

workdir=""
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[i]}" in
    --workdir=*) workdir="${ARGS[i]#*=}" ;;
    --workdir) workdir="${ARGS[i + 1]:-}" ;;
  esac
done
if [[ "$MODULE" == beta_clip_jax.main && "$workdir" != gs://* ]]; then
  note "warning: workdir '${workdir:-<none>}' is not gs://: on a pod every worker must see the" \
    "same workdir, and a Spot/preempted VM loses its disk"
fi

D="$(quote "$REMOTE_DIR")"
env_words=(env "BETA_CLIP_RUN=$RUN" ${ENVS[@]+"${ENVS[@]}"})
job="$(quote_all "${env_words[@]}" "$PYTHON" -m "$MODULE" "${ARGS[@]}")"
if ((KILL_EXISTING)); then
  guard="$(remote_stop . "" TERM 120)"
else
  guard="for f in logs/*.pid; do [ -e \"\$f\" ] || continue; \
if kill -0 \"\$(cat \"\$f\")\" 2>/dev/null; then echo \"\$(hostname): \$f is still running; \
stop it with launch/tpu_stop.sh or pass --kill-existing\" >&2; exit 1; fi; done"
fi
tpu_ssh all "set -e; cd $D; mkdir -p logs; $guard; \
setsid nohup $job > logs/$RUN.log 2>&1 < /dev/null & echo \$! > logs/$RUN.pid; \
ln -sfn $RUN.log logs/latest.log; echo \"\$(hostname): started $RUN (pid \$!)\""

note "started '$RUN' on all workers of $TPU_NAME; logs: $REMOTE_DIR/logs/$RUN.log on each worker"
if [[ "$FOLLOW" != none ]]; then
  logs=("$LAUNCH_DIR/tpu_logs.sh" "--name=$TPU_NAME" "--zone=$ZONE" "--run=$RUN"
    "--worker=$FOLLOW" "--remote-dir=$REMOTE_DIR")
  [[ -n "$PROJECT_ID" ]] && logs+=("--project=$PROJECT_ID")
  DRY_RUN="$DRY_RUN" "${logs[@]}"
fi
