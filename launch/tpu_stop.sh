#!/usr/bin/env bash
# Stop a run started by launch/tpu_run.sh on every worker: SIGTERM (the trainer saves a
# checkpoint and exits), then SIGKILL to what is left after a grace period.
#
# Usage:
#   launch/tpu_stop.sh --name=NAME --zone=ZONE [--run=RUN] [--grace=SECONDS] [--signal=SIG] [--dry-run]
#
# Options:
#   --name=NAME, --zone=ZONE, --project=PROJECT   as for tpu_create.sh [TPU_NAME, ZONE, PROJECT_ID]
#   --run=RUN          only this run; default: every run started by tpu_run.sh
#   --grace=SECONDS    how long to wait after the signal before SIGKILL [120]
#   --signal=SIG       the first signal [TERM]
#   --remote-dir=DIR   code directory on the workers [beta_clip_jax]
#   --dry-run          print the command instead of running it [DRY_RUN=1]
#
# Rerunning the same launch/tpu_run.sh command afterwards resumes from the checkpoint.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN=""
GRACE=120
SIGNAL=TERM
REMOTE_DIR="beta_clip_jax"
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  case "$1" in
    --run=*) RUN="${1#*=}" ;;
    --grace=*) GRACE="${1#*=}" ;;
    --signal=*) SIGNAL="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
require_tpu
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "--grace=$GRACE: a number of seconds"
[[ "$SIGNAL" =~ ^[A-Z0-9]+$ ]] || die "--signal=$SIGNAL: a signal name such as TERM or INT"
tpu_ssh all "$(remote_stop "$(quote "$REMOTE_DIR")" "$RUN" "$SIGNAL" "$GRACE")"
