# shellcheck shell=bash
# Helpers shared by the launch/*.sh scripts; sourced, never run on its own.
#
# Every script takes --dry-run (or DRY_RUN=1): it then prints, one per line on stdout, the exact
# commands it would run, shell-quoted so that they can be pasted into a shell, and runs none.
# Messages for people go to stderr.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_DIR="$(dirname "$LAUNCH_DIR")"
DRY_RUN="${DRY_RUN:-0}"
GCLOUD="${GCLOUD:-gcloud}"

# Cloud TPU settings: flags override these environment variables (the names Google's docs use).
TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT_ID="${PROJECT_ID:-}"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

note() {
  echo "[$(basename "$0")] $*" >&2
}

# Prints the script's header comment (from line 2 to the first line that is not a comment).
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# One word, quoted so that bash, sh and Python's shlex.split read it back unchanged.
quote() {
  local s="$1"
  if [[ "$s" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or with DRY_RUN=1 prints it as one shell-quoted line on stdout.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

# Consumes one flag shared by the Cloud TPU scripts; returns 1 when the flag is not one of them.
common_flag() {
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT_ID="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) return 1 ;;
  esac
}

require_tpu() {
  [[ -n "$TPU_NAME" ]] || die "no TPU name: pass --name=NAME or set TPU_NAME"
  [[ -n "$ZONE" ]] || die "no zone: pass --zone=ZONE or set ZONE"
}

# --zone and, when given, --project, for every gcloud call.
location_flags() {
  LOCATION=("--zone=$ZONE")
  if [[ -n "$PROJECT_ID" ]]; then
    LOCATION+=("--project=$PROJECT_ID")
  fi
}

# gcloud compute tpus tpu-vm ssh NAME --worker=WORKER --command=COMMAND
tpu_ssh() {
  local worker="$1" command="$2"
  shift 2
  location_flags
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" \
    "--worker=$worker" "--command=$command" "$@"
}

# Remote shell text that signals the run(s) started by tpu_run.sh in logs/ of directory $1:
# SIGNAL to each run's main process, then, after GRACE seconds, SIGKILL to its process group.
# Arguments: DIR (already quoted) RUN ("" for every run) SIGNAL GRACE.
remote_stop() {
  local dir="$1" run_name="$2" signal="$3" grace="$4" pids
  pids="$dir/logs/*.pid"
  [[ -n "$run_name" ]] && pids="$dir/logs/$(quote "$run_name").pid"
  printf '%s' "for f in $pids; do [ -e \"\$f\" ] || continue; p=\$(cat \"\$f\"); \
if kill -0 \"\$p\" 2>/dev/null; then echo \"\$(hostname): $signal to \$p (\$f)\"; \
kill -$signal \"\$p\"; i=0; while kill -0 \"\$p\" 2>/dev/null && [ \$i -lt $grace ]; do \
sleep 1; i=\$((i+1)); done; if kill -0 \"\$p\" 2>/dev/null; then \
echo \"\$(hostname): still running after ${grace}s, SIGKILL\"; kill -KILL -- -\"\$p\"; fi; fi; \
rm -f \"\$f\"; done"
}

# The interpreter for local runs: an activated environment's python3, else this checkout's
# .venv, else python3 from PATH.
default_python() {
  if [[ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && -x "$REPO_DIR/.venv/bin/python" ]]; then
    printf '%s' "$REPO_DIR/.venv/bin/python"
  else
    printf '%s' python3
  fi
}
