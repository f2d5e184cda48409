#!/usr/bin/env bash
# Run N processes on this machine as one multi-process JAX cluster on CPU: the pod code path
# (jax.distributed, one process per host, gloo collectives across processes) without a pod.
#
# Usage:
#   launch/local_cluster.sh [options] N [TRAINER_ARGS...]      runs python -m beta_clip_jax.main
#   launch/local_cluster.sh [options] N -- COMMAND [ARGS...]   runs any command
#
# Options (before N):
#   --devices=K       CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=K) [1]
#   --port=PORT       coordinator port on 127.0.0.1 [a free port]
#   --log-dir=DIR     each process writes DIR/process_I.log [a new temporary directory]
#   --python=PYTHON   interpreter for the trainer [python3 of an activated environment,
#                     else .venv/bin/python of this checkout, else python3]
#   --timeout=S       stop everything if not finished after S seconds (exit 124) [none]
#   --grace=S         after a failure, seconds between SIGTERM and SIGKILL for the others [10]
#   --quiet           do not echo process 0's output here (it is in its log either way)
#   --dry-run         print the commands instead of running them [DRY_RUN=1]
#
# Each process I gets BETA_CLIP_COORDINATOR=127.0.0.1:PORT, BETA_CLIP_NUM_PROCESSES=N,
# BETA_CLIP_PROCESS_ID=I, JAX_PLATFORMS=cpu and JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo, which
# beta_clip_jax.distributed.maybe_initialize() turns into jax.distributed.initialize(...).
# The script waits for all processes. If one fails, it stops the others (SIGTERM, then SIGKILL)
# and exits with the failed process's status after showing the end of its log. SIGINT or
# SIGTERM to this script is passed on to all processes (the trainer then checkpoints).
#
# Examples:
#   launch/local_cluster.sh 2 --config=configs/NAME.py --workdir=/tmp/run --config.FIELD=VALUE
#   launch/local_cluster.sh --devices=4 2 -- python -c 'import jax; print(jax.devices())'
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DEVICES=1
PORT=""
LOG_DIR=""
PYTHON=""
TIMEOUT=""
GRACE=10
QUIET=0
while (($#)); do
  case "$1" in
    --devices=*) DEVICES="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --timeout=*) TIMEOUT="${1#*=}" ;;
    --grace=*) GRACE="${1#*=}" ;;
    --quiet) QUIET=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option '$1' (options go before N; see --help)" ;;
    *) break ;;
  esac
  shift
done
(($#)) || die "missing N, the number of processes (see --help)"
N="$1"
shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N='$N': a positive number of processes"
for pair in "devices:$DEVICES" "grace:$GRACE" "timeout:${TIMEOUT:-1}" "port:${PORT:-1}"; do
  [[ "${pair#*:}" =~ ^[0-9]+$ ]] || die "--${pair%%:*}=${pair#*:}: a whole number"
done
PYTHON="${PYTHON:-$(default_python)}"
if [[ "${1:-}" == "--" ]]; then
  shift
  (($#)) || die "nothing after --: give the command to run"
  COMMAND=("$@")
else
  COMMAND=("$PYTHON" -m beta_clip_jax.main "$@")
fi

if [[ -z "$PORT" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    PORT=12355
  else
    PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi
if [[ -z "$LOG_DIR" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    LOG_DIR="${TMPDIR:-/tmp}/beta_clip_local_cluster"
  else
    LOG_DIR="$(mktemp -d -t beta_clip_local_cluster.XXXXXX)"
  fi
fi
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$LOG_DIR"

# Keep the caller's XLA flags, but this script decides the CPU device count.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$DEVICES"

PIDS=()
EXIT_CODES=()
for ((i = 0; i < N; i++)); do
  line=(env "BETA_CLIP_COORDINATOR=127.0.0.1:$PORT" "BETA_CLIP_NUM_PROCESSES=$N"
    "BETA_CLIP_PROCESS_ID=$i" JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    "XLA_FLAGS=$xla_flags" "${COMMAND[@]}")
  log="$LOG_DIR/process_$i.log"
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s > %s 2>&1 &\n' "$(quote_all "${line[@]}")" "$(quote "$log")"
    continue
  fi
  if ((i == 0 && !QUIET)); then
    "${line[@]}" </dev/null > >(tee "$log") 2>&1 &
  else
    "${line[@]}" </dev/null >"$log" 2>&1 &
  fi
  PIDS+=("$!")
  EXIT_CODES+=("")
done
if [[ "$DRY_RUN" == 1 ]]; then
  echo wait
  exit 0
fi
note "$N processes on 127.0.0.1:$PORT, $DEVICES CPU device(s) each; logs in $LOG_DIR"

# Signals every process still running: SIG first, SIGKILL after GRACE seconds.
stop_all() {
  local sig="$1" i t
  for i in "${!PIDS[@]}"; do
    [[ -n "${EXIT_CODES[i]}" ]] || kill "-$sig" "${PIDS[i]}" 2>/dev/null || true
  done
  for ((t = 0; t < GRACE * 10; t++)); do
    alive=0
    for i in "${!PIDS[@]}"; do
      [[ -n "${EXIT_CODES[i]}" ]] || ! kill -0 "${PIDS[i]}" 2>/dev/null || alive=1
    done
    ((alive)) || return 0
    sleep 0.1
  done
  for i in "${!PIDS[@]}"; do
    [[ -n "${EXIT_CODES[i]}" ]] || kill -KILL "${PIDS[i]}" 2>/dev/null || true
  done
}
trap 'note "interrupted: passing SIGTERM on"; stop_all TERM; exit 143' INT TERM

status=0
failed=""
STOPPED=75 # the trainer's status for "stopped early with a checkpoint; rerun to resume"
start=$SECONDS
left=$N
while ((left)); do
  for i in "${!PIDS[@]}"; do
    [[ -z "${EXIT_CODES[i]}" ]] || continue
    ! kill -0 "${PIDS[i]}" 2>/dev/null || continue
    rc=0
    wait "${PIDS[i]}" || rc=$?
    EXIT_CODES[i]=$rc
    left=$((left - 1))
    if ((rc == STOPPED)) && [[ -z "$failed" ]]; then
      status=$STOPPED # stopped with a checkpoint at the step all processes agreed on
    elif ((rc != 0)) && [[ -z "$failed" ]]; then
      failed=$i
      status=$rc
      note "process $i failed (exit $rc); stopping the others"
      stop_all TERM
    fi
  done
  if [[ -n "$TIMEOUT" ]] && ((SECONDS - start > TIMEOUT)) && ((left)); then
    note "timed out after ${TIMEOUT}s; stopping all processes"
    stop_all TERM
    failed=${failed:-timeout}
    status=124
  fi
  ((left == 0)) || sleep 0.1
done

for i in "${!PIDS[@]}"; do
  note "process $i: exit ${EXIT_CODES[i]}"
done
if [[ -n "$failed" && "$failed" != timeout ]]; then
  note "last lines of $LOG_DIR/process_$failed.log:"
  tail -n 20 "$LOG_DIR/process_$failed.log" >&2
fi
exit "$status"
