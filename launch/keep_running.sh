#!/usr/bin/env bash
# Keep a sweep going on a Spot TPU slice until it is done: recreate the slice after a preemption,
# reinstall, fetch the weights again and resume the same gs:// workdir. See launch/README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/keep_running.sh --name NAME --zone ZONE --config CONFIG --workdir gs://BUCKET/DIR
                              [--accelerator TYPE] [--version RUNTIME] [--project P]
                              [--weights_cmd CMD] [--module M] [--max_retries N] [--poll S]
                              [--no_spot] [--create_flag FLAG]... [--ssh_flag FLAG]...
                              [--install_flag FLAG]... [--dry_run] [-- EXTRA_FLAGS...]

Runs a sweep (or --module) on a queued-resource TPU slice (Spot by default) until
WORKDIR/summary.json exists, surviving preemptions. Each round:

  1. `gcloud compute tpus queued-resources describe` the request (its id is NAME):
     none yet                                   create it (create_tpu.sh --queued [--spot])
     WAITING_FOR_RESOURCES, PROVISIONING, ...   wait
     ACTIVE, not set up in this round           install.sh, then --weights_cmd on every worker,
                                                then run_sweep.sh (detached); the run resumes the
                                                workdir's finished batches
     ACTIVE, set up                             done when summary.json exists; a run that stopped
                                                without it is started again (a retry)
     SUSPENDING, SUSPENDED, FAILED              preempted (a Spot slice is deleted with its disks:
                                                venv, weights, logs): delete the request, create it
                                                again (a retry)
  2. sleep --poll seconds.

It gives up (exit 1) after --max_retries retries, and leaves the request for delete_tpu.sh --queued.
A Spot slice is deleted with its boot disk on preemption, so the workdir must be gs:// and the
weights must come back by --weights_cmd (a command every worker runs after the install, e.g. a
`gcloud storage cp -r gs://BUCKET/ckpt ~/ckpt` or a Hugging Face download).

  --name NAME          TPU and queued-resource name ($TPU_NAME)                      [required]
  --zone ZONE          zone ($TPU_ZONE)                                              [required]
  --config CONFIG      as run_sweep.sh                                               [required]
  --workdir gs://...   as run_sweep.sh; must be gs://                                [required]
  --accelerator TYPE   as create_tpu.sh ($TPU_ACCELERATOR; default v5litepod-8)
  --version RUNTIME    as create_tpu.sh ($TPU_VERSION)
  --project P          GCP project ($TPU_PROJECT)
  --weights_cmd CMD    shell command every worker runs after each install (default: none)
  --module M           as run_sweep.sh (default rhead_jax.sweep)
  --max_retries N      recreations and restarts before giving up (default 10)
  --poll S             seconds between checks (default 60)
  --no_spot            on-demand capacity (preemption then only by maintenance)
  --create_flag FLAG   as create_tpu.sh (repeatable; $TPU_CREATE_FLAGS)
  --ssh_flag FLAG      as the other scripts (repeatable; $TPU_SSH_FLAGS)
  --install_flag FLAG  one more flag for install.sh, e.g. --install_flag=--jax='jax[tpu]==0.10.2'
  --dry_run            print the first round's commands, run nothing
  -h, --help           this help
  -- FLAGS...          passed to the Python entry point (as run_sweep.sh)

Example:
  launch/keep_running.sh --name rhead-v5e --zone us-west4-a --accelerator v5litepod-8 \
      --config yi_6b_200k.py --workdir gs://my-bucket/yi6b \
      --weights_cmd 'gcloud storage cp -r gs://my-bucket/ckpt/Yi-6B-200K ~/ckpt/' \
      -- --config.model.path='~/ckpt/Yi-6B-200K'
EOF
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR=${TPU_ACCELERATOR:-v5litepod-8}
VERSION=${TPU_VERSION:-}
CONFIG=""
WORKDIR=""
WEIGHTS_CMD=""
MODULE=rhead_jax.sweep
MAX_RETRIES=10
POLL=60
SPOT=1
CREATE=()
INSTALL=()
PASS=()

while (($#)); do
  if shared_flag "$@"; then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --accelerator | --accelerator=*) take "$@"; ACCELERATOR=$VAL; shift "$SHIFT" ;;
    --version | --version=*) take "$@"; VERSION=$VAL; shift "$SHIFT" ;;
    --config | --config=*) take "$@"; CONFIG=$VAL; shift "$SHIFT" ;;
    --workdir | --workdir=*) take "$@"; WORKDIR=$VAL; shift "$SHIFT" ;;
    --weights_cmd | --weights_cmd=*) take "$@"; WEIGHTS_CMD=$VAL; shift "$SHIFT" ;;
    --module | --module=*) take "$@"; MODULE=$VAL; shift "$SHIFT" ;;
    --max_retries | --max_retries=*) take "$@"; MAX_RETRIES=$VAL; shift "$SHIFT" ;;
    --poll | --poll=*) take "$@"; POLL=$VAL; shift "$SHIFT" ;;
    --no_spot) SPOT=0; shift ;;
    --create_flag | --create_flag=*) take "$@"; check_gcloud_flag "$VAL" --create_flag; CREATE+=(--create_flag="$VAL"); shift "$SHIFT" ;;
    --install_flag | --install_flag=*) take "$@"; INSTALL+=("$VAL"); shift "$SHIFT" ;;
    --config.*) PASS+=("$1"); shift ;;
    --) shift; PASS+=("$@"); break ;;
    *) die "unknown argument '$1' (flags for $MODULE go after --)" ;;
  esac
done

require "$NAME" --name TPU_NAME
require "$ZONE" --zone TPU_ZONE
require "$CONFIG" --config
require "$WORKDIR" --workdir
[[ $WORKDIR == gs://* ]] || die "--workdir $WORKDIR: a preempted Spot slice loses its disks; give a gs:// workdir"
[[ $MAX_RETRIES =~ ^[0-9]+$ ]] || die "--max_retries takes a whole number, got '$MAX_RETRIES'"
[[ $POLL =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--poll takes seconds, got '$POLL'"
set_location
export DRY_RUN
# every child script gets the same connection flags through the environment
TPU_SSH_FLAGS=${SSH_FLAGS[*]+"${SSH_FLAGS[*]}"}
export TPU_SSH_FLAGS
unset TPU_CREATE_FLAGS  # already in CREATE, as --create_flag
WHERE=(--name="$NAME" --zone="$ZONE")
[[ -n $PROJECT ]] && WHERE+=(--project="$PROJECT")
SUMMARY=${WORKDIR%/}/summary.json

log() { echo "$PROG: $*"; }

state() {  # the queued resource's state; empty when there is none
  run_quiet "$GCLOUD" compute tpus queued-resources describe "$NAME" "${GCLOUD_LOC[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

done_yet() {
  if [[ $DRY_RUN == 1 ]]; then
    run_quiet "$GCLOUD" storage ls "$SUMMARY"
    return 1
  fi
  run_quiet "$GCLOUD" storage ls "$SUMMARY" >/dev/null 2>&1
}

create() {
  local spot=()
  ((SPOT)) && spot=(--spot)
  local version=()
  [[ -n $VERSION ]] && version=(--version="$VERSION")
  "$HERE/create_tpu.sh" "${WHERE[@]}" --accelerator="$ACCELERATOR" ${version[@]+"${version[@]}"} --queued \
    ${spot[@]+"${spot[@]}"} ${CREATE[@]+"${CREATE[@]}"}
}

setup_and_start() {
  "$HERE/install.sh" "${WHERE[@]}" ${INSTALL[@]+"${INSTALL[@]}"}
  if [[ -n $WEIGHTS_CMD ]]; then
    run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOC[@]}" --worker=all \
      ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --command="set -e; $WEIGHTS_CMD"
  fi
  start_run
}

start_run() {
  "$HERE/run_sweep.sh" "${WHERE[@]}" --module="$MODULE" --config="$CONFIG" --workdir="$WORKDIR" \
    -- ${PASS[@]+"${PASS[@]}"}
}

retry() {  # retry REASON: count one more retry, or give up
  RETRIES=$((RETRIES + 1))
  if ((RETRIES > MAX_RETRIES)); then
    echo "$PROG: giving up after $MAX_RETRIES retries ($*); $SUMMARY does not exist yet." >&2
    echo "$PROG: the workdir keeps the finished batches: run this again to resume; delete the request with" \
      "launch/delete_tpu.sh --name $NAME --zone $ZONE --queued" >&2
    exit 1
  fi
  log "retry $RETRIES of $MAX_RETRIES: $*"
}

RETRIES=0
SET_UP=0
while :; do
  if done_yet; then
    log "$SUMMARY exists: done. Fetch it with launch/fetch_results.sh --workdir $WORKDIR;" \
      "delete the slice with launch/delete_tpu.sh --name $NAME --zone $ZONE --queued"
    exit 0
  fi
  st=$(state)
  if [[ $DRY_RUN == 1 ]]; then  # one round's commands, as if there were no request yet
    create
    setup_and_start
    exit 0
  fi
  case $st in
    "")
      if ((SET_UP)); then retry "the queued resource $NAME is gone"; fi
      log "no queued resource $NAME: creating it"
      create
      SET_UP=0 ;;
    ACTIVE)
      if ((!SET_UP)); then
        log "$NAME is ACTIVE: installing, fetching the weights, starting $MODULE"
        setup_and_start
        SET_UP=1
      elif ! "$HERE/run_sweep.sh" "${WHERE[@]}" --module="$MODULE" --status >/dev/null; then
        if done_yet; then continue; fi
        retry "$MODULE is not running on every worker and $SUMMARY does not exist"
        "$HERE/run_sweep.sh" "${WHERE[@]}" --module="$MODULE" --stop >/dev/null || true
        start_run
      fi ;;
    SUSPENDING | SUSPENDED | FAILED)
      log "queued resource $NAME is $st (preempted: the slice and its disks are gone)"
      retry "$NAME was $st"
      "$HERE/delete_tpu.sh" "${WHERE[@]}" --queued --yes
      create
      SET_UP=0 ;;
    *) log "queued resource $NAME is $st: waiting" ;;
  esac
  sleep "$POLL"
done
