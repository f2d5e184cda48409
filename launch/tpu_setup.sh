#!/usr/bin/env bash
# Put this code on every worker of a TPU VM or pod slice and install it with jax[tpu].
#
# Usage:
#   launch/tpu_setup.sh --name=NAME --zone=ZONE [options]
#
# Options:
#   --name=NAME, --zone=ZONE, --project=PROJECT   as for tpu_create.sh [TPU_NAME, ZONE, PROJECT_ID]
#   --git=URL          clone URL on each worker instead of copying the local tree
#   --ref=REF          with --git: commit, tag or branch to check out; default: the local HEAD
#                      commit (push it first)
#   --remote-dir=DIR   where the code goes on each worker, relative to home [beta_clip_jax]
#   --python=PYTHON    interpreter on the workers [python3]
#   --venv=PATH        create a virtual environment at PATH on each worker and install into it;
#                      then pass --python=PATH/bin/python to tpu_run.sh
#   --extras=LIST      extras of this package to install too, e.g. tfds
#   --no-install       only copy or update the code
#   --check            afterwards, start JAX on all workers together and print what each sees
#   --dry-run          print the commands instead of running them [DRY_RUN=1]
#
# Without --git, the working tree (tracked plus untracked, not ignored files; committed or not)
# is packed here and copied with `gcloud compute tpus tpu-vm scp --worker=all`; the remote
# directory is replaced except for its logs/. Besides this package and jax[tpu], it installs
# gcsfs and google-cloud-storage so that gs:// workdirs and data work (see docs/launch.md).
# Do not run it while a job is running on the TPU: that job imports from the same directory.
#
# Example:
#   launch/tpu_setup.sh --name=bclip --zone=us-central2-b --check
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GIT_URL=""
REF=""
REMOTE_DIR="beta_clip_jax"
PYTHON="python3"
VENV=""
EXTRAS=""
INSTALL=1
CHECK=0
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  case "$1" in
    --git=*) GIT_URL="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --extras=*) EXTRAS="${1#*=}" ;;
    --no-install) INSTALL=0 ;;
    --check) CHECK=1 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
require_tpu
location_flags
D="$(quote "$REMOTE_DIR")"

if [[ -n "$GIT_URL" ]]; then
  if [[ -z "$REF" ]]; then
    REF="$(git -C "$REPO_DIR" rev-parse HEAD)"
    if [[ -n "$(git -C "$REPO_DIR" status --porcelain --untracked-files=no)" ]]; then
      note "warning: uncommitted changes here are not in $REF; the workers will not see them"
    fi
  fi
  R="$(quote "$REF")"
  fetch="[ -d $D/.git ] || git clone --quiet $(quote "$GIT_URL") $D; \
git -C $D fetch --quiet --tags origin $R; git -C $D checkout --quiet --force FETCH_HEAD"
  tpu_ssh all "set -e; $fetch; echo \"\$(hostname): \$(git -C $D rev-parse --short HEAD)\""
else
  if [[ "$DRY_RUN" == 1 ]]; then
    tarball="${TMPDIR:-/tmp}/beta_clip_code.tar.gz"
    note "would pack $REPO_DIR (git ls-files -co --exclude-standard) into $tarball"
  else
    tarball="$(mktemp -t beta_clip_code.XXXXXX.tar.gz)"
    trap 'rm -f "$tarball"' EXIT
    # Listed files deleted from the working tree are left out.
    (cd "$REPO_DIR" && git ls-files -z -co --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done |
      tar -czf "$tarball" --null -T -)
    note "packed $(du -h "$tarball" | cut -f1) of code"
  fi
  run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$TPU_NAME:beta_clip_code.tar.gz" \
    "${LOCATION[@]}" --worker=all
  tpu_ssh all "set -e; mkdir -p $D/logs; \
find $D -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +; \
tar -xzf beta_clip_code.tar.gz -C $D; rm -f beta_clip_code.tar.gz; \
echo \"\$(hostname): code in \$(cd $D && pwd)\""
fi

if ((INSTALL)); then
  py="$(quote "$PYTHON")"
  setup_env=""
  if [[ -n "$VENV" ]]; then
    setup_env="$(quote "$PYTHON") -m venv $(quote "$VENV"); "
    py="$(quote "$VENV/bin/python")"
  fi
  package="$REMOTE_DIR"
  [[ -n "$EXTRAS" ]] && package="${REMOTE_DIR}[$EXTRAS]"
  tpu_ssh all "set -e; $setup_env$py -m pip install --quiet --upgrade pip; \
$py -m pip install --quiet -e $(quote "./$package") 'jax[tpu]' gcsfs google-cloud-storage; \
echo \"\$(hostname): \$($py -c 'import jax; print(\"jax\", jax.__version__)')\""
fi

if ((CHECK)); then
  py="$(quote "$PYTHON")"
  [[ -n "$VENV" ]] && py="$(quote "$VENV/bin/python")"
  tpu_ssh all "$py -c 'from beta_clip_jax import distributed; import jax; \
print(\"process %d of %d\" % distributed.maybe_initialize(), jax.local_device_count(), \
\"local devices,\", jax.device_count(), \"in all\")'"
fi
note "next: launch/tpu_run.sh --name=$TPU_NAME --zone=$ZONE -- --config=configs/NAME.py --workdir=gs://BUCKET/RUN"
