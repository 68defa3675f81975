#!/usr/bin/env bash
# Delete a Cloud TPU VM (or its queued resource) made by create_tpu.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/delete_tpu.sh --name NAME --zone ZONE [--project P] [--queued [--qr_id ID]]
                            [--yes] [--async] [--dry_run]

Deletes the TPU VM with `gcloud compute tpus tpu-vm delete`; with --queued, deletes the queued
resource and its node (`gcloud compute tpus queued-resources delete --force`). Results on the
workers' disks are lost: fetch them first (fetch_results.sh).

  --name NAME      TPU name ($TPU_NAME)                                              [required]
  --zone ZONE      zone ($TPU_ZONE)                                                  [required]
  --project P      GCP project ($TPU_PROJECT)
  --queued         the TPU was created with create_tpu.sh --queued
  --qr_id ID       queued-resource id (default: NAME)
  --yes            do not ask for confirmation (gcloud --quiet)
  --async          return without waiting for the deletion to finish
  --dry_run        print the gcloud command, run nothing
  --ssh_flag FLAG  accepted for symmetry with the other scripts (this one never connects)
  -h, --help       this help
EOF
}

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
QUEUED=0
QR_ID=""
YES=0
ASYNC=0

while (($#)); do
  if shared_flag "$@"; then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --qr_id | --qr_id=*) take "$@"; QR_ID=$VAL; shift "$SHIFT" ;;
    --queued) QUEUED=1; shift ;;
    --yes | -y | --quiet) YES=1; shift ;;
    --async) ASYNC=1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done

require "$NAME" --name TPU_NAME
require "$ZONE" --zone TPU_ZONE
set_location
FLAGS=()
((YES)) && FLAGS+=(--quiet)
((ASYNC)) && FLAGS+=(--async)

if ((QUEUED)); then
  run "$GCLOUD" compute tpus queued-resources delete "${QR_ID:-$NAME}" "${GCLOUD_LOC[@]}" --force \
    ${FLAGS[@]+"${FLAGS[@]}"}
else
  run "$GCLOUD" compute tpus tpu-vm delete "$NAME" "${GCLOUD_LOC[@]}" ${FLAGS[@]+"${FLAGS[@]}"}
fi
