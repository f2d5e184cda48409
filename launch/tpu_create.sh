#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice, directly or as a queued resource.
#
# Usage:
#   launch/tpu_create.sh --name=NAME --zone=ZONE --accelerator-type=TYPE [options] [-- GCLOUD_FLAGS...]
#
# Options (flags win over the environment variables in brackets):
#   --name=NAME               TPU name [TPU_NAME]
#   --zone=ZONE               zone, e.g. us-central2-b [ZONE]
#   --project=PROJECT         project; default: gcloud's configured project [PROJECT_ID]
#   --accelerator-type=TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-64, v6e-8 [ACCELERATOR_TYPE]
#   --runtime-version=VER     TPU software version [RUNTIME_VERSION]; default by generation:
#                             v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e/v5litepod
#                             v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base
#   --queued                  ask for a queued resource (queued-resources create, named NAME,
#                             node id NAME): waits in a queue for capacity instead of failing
#   --spot                    Spot capacity: cheaper, can be preempted at any time
#   --reserved                use a reservation
#   --valid-until=DURATION    queued only: give up if not provisioned within DURATION (e.g. 6h)
#   --wait                    queued only: poll until the resource is ACTIVE (or FAILED)
#   --dry-run                 print the gcloud commands instead of running them [DRY_RUN=1]
#   -- GCLOUD_FLAGS...        passed to gcloud unchanged (e.g. --network=..., --labels=...)
#
# Examples:
#   launch/tpu_create.sh --name=bclip --zone=us-central2-b --accelerator-type=v4-32
#   launch/tpu_create.sh --name=bclip --zone=us-east5-b --accelerator-type=v6e-16 --queued --spot --wait
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
QUEUED=0
SPOT=0
RESERVED=0
VALID_UNTIL=""
WAIT=0
EXTRA=()
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  case "$1" in
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --valid-until=*) VALID_UNTIL="${1#*=}" ;;
    --wait) WAIT=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
require_tpu
[[ -n "$ACCELERATOR_TYPE" ]] || die "no accelerator type: pass --accelerator-type=TYPE (e.g. v4-8)"
((SPOT && RESERVED)) && die "--spot and --reserved exclude each other"
((QUEUED)) || [[ -z "$VALID_UNTIL" && "$WAIT" == 0 ]] || die "--valid-until and --wait need --queued"

if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for '$ACCELERATOR_TYPE': pass --runtime-version=VER" ;;
  esac
fi

location_flags
CAPACITY=()
((SPOT)) && CAPACITY+=(--spot)
((RESERVED)) && CAPACITY+=(--reserved)

if ((QUEUED)); then
  args=(compute tpus queued-resources create "$TPU_NAME" "${LOCATION[@]}"
    "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE"
    "--runtime-version=$RUNTIME_VERSION")
  [[ -n "$VALID_UNTIL" ]] && args+=("--valid-until-duration=$VALID_UNTIL")
  run "$GCLOUD" "${args[@]}" ${CAPACITY[@]+"${CAPACITY[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  note "queued resource '$TPU_NAME' requested; state: $GCLOUD compute tpus queued-resources describe $TPU_NAME ${LOCATION[*]}"
  if ((WAIT)); then
    describe=("$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}"
      "--format=value(state.state)")
    if [[ "$DRY_RUN" == 1 ]]; then
      run "${describe[@]}"
    else
      while true; do
        state="$("${describe[@]}")"
        note "state: $state"
        case "$state" in
          ACTIVE) break ;;
          FAILED | SUSPENDED) die "queued resource '$TPU_NAME' is $state" ;;
        esac
        sleep 60
      done
    fi
  fi
else
  run "$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
    ${CAPACITY[@]+"${CAPACITY[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
fi
note "next: launch/tpu_setup.sh --name=$TPU_NAME --zone=$ZONE"
