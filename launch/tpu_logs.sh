#!/usr/bin/env bash
# Show or fetch the logs of a run started by launch/tpu_run.sh.
#
# Usage:
#   launch/tpu_logs.sh --name=NAME --zone=ZONE [options]
#
# Options:
#   --name=NAME, --zone=ZONE, --project=PROJECT   as for tpu_create.sh [TPU_NAME, ZONE, PROJECT_ID]
#   --run=RUN          which run; default: the latest one started on each worker
#   --worker=WORKER    worker number, or all (lines then start with the worker's hostname) [0]
#   --lines=N          start from the last N lines; 'all' for the whole log [all]
#   --no-follow        print and exit instead of streaming new lines (tail -F)
#   --fetch=DIR        copy each worker's whole log to DIR/WORKER.log here (gcloud's
#                      --output-directory) and exit
#   --remote-dir=DIR   code directory on the workers [beta_clip_jax]
#   --dry-run          print the commands instead of running them [DRY_RUN=1]
#
# Only process 0 logs at INFO; the other workers' logs mostly matter when one of them fails.
#
# Example:
#   launch/tpu_logs.sh --name=bclip --zone=us-central2-b --worker=all --lines=50
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN=""
WORKER=0
LINES=all
FOLLOW=1
FETCH=""
REMOTE_DIR="beta_clip_jax"
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  case "$1" in
    --run=*) RUN="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --lines=*) LINES="${1#*=}" ;;
    --no-follow) FOLLOW=0 ;;
    --fetch=*) FETCH="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
require_tpu
[[ "$LINES" == all || "$LINES" =~ ^[0-9]+$ ]] || die "--lines=$LINES: a number or all"

log="$(quote "$REMOTE_DIR")/logs/$(quote "${RUN:-latest}").log"
if [[ -n "$FETCH" ]]; then
  [[ "$DRY_RUN" == 1 ]] || mkdir -p "$FETCH"
  tpu_ssh all "cat $log" "--output-directory=$FETCH"
  note "logs in $FETCH/<worker>.log"
  exit 0
fi

start="-n +1"
[[ "$LINES" != all ]] && start="-n $LINES"
follow=""
((FOLLOW)) && follow="-F"
command="tail $start $follow $log"
if [[ "$WORKER" == all ]]; then
  command="$command | sed -u \"s/^/\$(hostname): /\""
fi
tpu_ssh "$WORKER" "$command"
