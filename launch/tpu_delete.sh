#!/usr/bin/env bash
# Delete a TPU VM or pod slice, or the queued resource that holds it.
#
# Usage:
#   launch/tpu_delete.sh --name=NAME --zone=ZONE [--project=PROJECT] [--queued] [--yes] [--dry-run]
#
# Options:
#   --name=NAME, --zone=ZONE, --project=PROJECT   as for tpu_create.sh [TPU_NAME, ZONE, PROJECT_ID]
#   --queued    it was made with tpu_create.sh --queued: delete the queued resource NAME and,
#               with --force, its TPU
#   --yes       do not ask for confirmation (gcloud --quiet)
#   --dry-run   print the command instead of running it [DRY_RUN=1]
#
# Deleting a TPU loses its disks (code, logs/); checkpoints in a gs:// workdir stay.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
YES=()
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  case "$1" in
    --queued) QUEUED=1 ;;
    --yes) YES=(--quiet) ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
require_tpu
location_flags
if ((QUEUED)); then
  run "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force \
    ${YES[@]+"${YES[@]}"}
else
  run "$GCLOUD" compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" ${YES[@]+"${YES[@]}"}
fi
