#!/usr/bin/env bash
# shellcheck disable=SC2088,SC2016  # ~ and $HOME in remote paths expand on the workers, not here
# Copy a sweep's results (a gs:// workdir, or a directory on worker 0) to this machine.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/fetch_results.sh --workdir gs://BUCKET/DIR [--dest DIR] [--gsutil] [--dry_run]
       launch/fetch_results.sh --name NAME --zone ZONE --remote_dir DIR [--dest DIR] [--worker N]
                               [--project P] [--ssh_flag FLAG]... [--dry_run]

Copies the workdir (head_scores.json, results.jsonl, summary.json, batches/, ...) into
DEST/<last path component of the workdir>.

  --workdir DIR      the sweep's --workdir. gs://...: copied with `gcloud storage cp -r`.
                     Any other path is a directory on the workers (same as --remote_dir).
  --dest DIR         local destination (default ./results)
  --gsutil           use `gsutil -m cp -r` instead of `gcloud storage cp -r`
  --name NAME        TPU name, for a workdir on the workers' disks ($TPU_NAME)
  --zone ZONE        zone ($TPU_ZONE)
  --project P        GCP project ($TPU_PROJECT)
  --remote_dir DIR   the workdir on the worker; relative paths are relative to --repo_dir, the
                     directory run_sweep.sh runs in
  --repo_dir DIR     default ~/rhead_jax
  --worker N         the worker to copy from (default 0: process 0 writes the results)
  --dry_run          print the commands, run nothing
  --ssh_flag FLAG    one more flag for `tpu-vm scp` (repeatable; $TPU_SSH_FLAGS), e.g. --internal-ip
  -h, --help         this help

Then: python -m rhead_jax.analyze DEST/<dir>/head_scores.json --results DEST/<dir>/results.jsonl --out DEST/<dir>/analysis
EOF
}

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
WORKDIR=""
DEST=./results
GSUTIL=0
REMOTE_DIR=""
REPO_DIR='~/rhead_jax'
WORKER=0

while (($#)); do
  if shared_flag "$@"; then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --workdir | --workdir=*) take "$@"; WORKDIR=$VAL; shift "$SHIFT" ;;
    --dest | --dest=*) take "$@"; DEST=$VAL; shift "$SHIFT" ;;
    --remote_dir | --remote_dir=*) take "$@"; REMOTE_DIR=$VAL; shift "$SHIFT" ;;
    --repo_dir | --repo_dir=*) take "$@"; REPO_DIR=$VAL; shift "$SHIFT" ;;
    --worker | --worker=*) take "$@"; WORKER=$VAL; shift "$SHIFT" ;;
    --gsutil) GSUTIL=1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done

require "$DEST" --dest
if [[ $WORKDIR == gs://* ]]; then
  [[ -z $REMOTE_DIR ]] || die "give --workdir gs://... or --remote_dir, not both"
  SRC=${WORKDIR%/}
  if [[ $DRY_RUN != 1 ]]; then
    mkdir -p "$DEST"
  fi
  if ((GSUTIL)); then
    run gsutil -m cp -r "$SRC" "$DEST"/
  else
    run "$GCLOUD" storage cp -r "$SRC" "$DEST"/
  fi
else
  REMOTE_DIR=${REMOTE_DIR:-$WORKDIR}
  if [[ -z $REMOTE_DIR ]]; then
    die "missing required flag --workdir gs://... (or --name, --zone and --remote_dir for a directory on a worker)"
  fi
  require "$NAME" --name TPU_NAME
  require "$ZONE" --zone TPU_ZONE
  [[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index, got '$WORKER'"
  check_remote_path "$REMOTE_DIR" --remote_dir
  check_remote_path "$REPO_DIR" --repo_dir
  case $REMOTE_DIR in
    /* | '~'* | '$'*) ;;
    *) REMOTE_DIR=${REPO_DIR%/}/$REMOTE_DIR ;;
  esac
  # scp resolves relative paths against the remote home; ~ and $HOME need a shell (not all scp modes have one)
  for home in '~/' '$HOME/' '${HOME}/'; do
    REMOTE_DIR=${REMOTE_DIR#"$home"}
  done
  set_location
  if [[ $DRY_RUN != 1 ]]; then
    mkdir -p "$DEST"
  fi
  run "$GCLOUD" compute tpus tpu-vm scp --recurse "$NAME:${REMOTE_DIR%/}" "$DEST"/ "${GCLOUD_LOC[@]}" \
    --worker="$WORKER" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"}
  SRC=$REMOTE_DIR
fi
echo "results: $DEST/$(basename "$SRC")"
