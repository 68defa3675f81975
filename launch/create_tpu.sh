#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice) for rhead_jax. See launch/README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/create_tpu.sh --name NAME --zone ZONE [--accelerator TYPE] [--version RUNTIME]
                            [--project P] [--spot] [--queued [--qr_id ID] [--wait]]
                            [--create_flag FLAG]... [--dry_run]

Creates a TPU VM with `gcloud compute tpus tpu-vm create`, or, with --queued, requests one with
`gcloud compute tpus queued-resources create` (the way to get spot/large slices; the node appears
when the request is ACTIVE).

  --name NAME          TPU name ($TPU_NAME)                                          [required]
  --zone ZONE          zone, e.g. us-west4-a for v5e, us-central2-b for v4 ($TPU_ZONE) [required]
  --accelerator TYPE   v5litepod-8 | v4-32 | v5p-128 | v6e-8 | ... ($TPU_ACCELERATOR; default v5litepod-8);
                       v5e-N is sent as v5litepod-N, the name gcloud takes. TPU7x is not served by
                       this API (use launch/gke/).
  --version RUNTIME    TPU software version ($TPU_VERSION); default by generation:
                       v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite,
                       v4 and older: tpu-ubuntu2204-base
  --project P          GCP project ($TPU_PROJECT; default: gcloud's configured project)
  --spot               spot capacity (cheaper, can be preempted)
  --queued             use a queued resource instead of creating the VM directly
  --qr_id ID           queued-resource id (default: NAME)
  --wait               with --queued: poll until the request is ACTIVE (fails on FAILED/SUSPENDED)
  --wait_timeout S     give up waiting after S seconds (default 3600)
  --poll S             seconds between polls (default 30)
  --create_flag FLAG   one more flag for the create command (repeatable; $TPU_CREATE_FLAGS, split on
                       whitespace), e.g. --create_flag=--service-account=SA_EMAIL (the identity the
                       workers write gs:// as), --create_flag=--network=NET, --create_flag=--internal-ips
  --ssh_flag FLAG      accepted for symmetry with the other scripts (this one never connects)
  --dry_run            print the gcloud commands, run nothing
  -h, --help           this help

Example:
  launch/create_tpu.sh --name rhead-v5e --zone us-west4-a --accelerator v5litepod-8 --spot
EOF
}

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR=${TPU_ACCELERATOR:-v5litepod-8}
VERSION=${TPU_VERSION:-}
SPOT=0
QUEUED=0
QR_ID=""
WAIT=0
WAIT_TIMEOUT=3600
POLL=30
EXTRA=()
if [[ -n ${TPU_CREATE_FLAGS:-} ]]; then
  read -r -a EXTRA <<<"$TPU_CREATE_FLAGS"
fi

while (($#)); do
  if shared_flag "$@"; then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --accelerator | --accelerator=* | --accelerator_type | --accelerator_type=* | --accelerator-type | --accelerator-type=*)
      take "$@"; ACCELERATOR=$VAL; shift "$SHIFT" ;;
    --version | --version=* | --runtime_version | --runtime_version=*) take "$@"; VERSION=$VAL; shift "$SHIFT" ;;
    --qr_id | --qr_id=*) take "$@"; QR_ID=$VAL; shift "$SHIFT" ;;
    --wait_timeout | --wait_timeout=*) take "$@"; WAIT_TIMEOUT=$VAL; shift "$SHIFT" ;;
    --poll | --poll=*) take "$@"; POLL=$VAL; shift "$SHIFT" ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --wait) WAIT=1; shift ;;
    --create_flag | --create_flag=*) take "$@"; check_gcloud_flag "$VAL" --create_flag; EXTRA+=("$VAL"); shift "$SHIFT" ;;
    --) die "pass gcloud flags with --create_flag FLAG (one per flag)" ;;
    *) die "unknown argument '$1' (gcloud flags go in --create_flag FLAG)" ;;
  esac
done

require "$NAME" --name TPU_NAME
require "$ZONE" --zone TPU_ZONE
require "$ACCELERATOR" --accelerator TPU_ACCELERATOR
ACCELERATOR=$(accelerator_type "$ACCELERATOR")
case $ACCELERATOR in
  tpu7x-* | v7x-* | tpu7-*) die "--accelerator $ACCELERATOR: the Cloud TPU VM API does not serve TPU7x; run it on GKE (launch/gke/README.md)" ;;
esac
if [[ -z $VERSION ]]; then
  case $ACCELERATOR in
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) VERSION=tpu-ubuntu2204-base ;;
    *) die "no default --version for accelerator '$ACCELERATOR'; pass --version RUNTIME" ;;
  esac
fi
if ((WAIT)) && ! ((QUEUED)); then
  die "--wait only applies to --queued"
fi
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ && $POLL =~ ^[0-9]+$ ]] || die "--wait_timeout and --poll take whole seconds"
set_location
SPOT_FLAG=()
((SPOT)) && SPOT_FLAG=(--spot)

if ((QUEUED)); then
  QR_ID=${QR_ID:-$NAME}
  run "$GCLOUD" compute tpus queued-resources create "$QR_ID" --node-id="$NAME" "${GCLOUD_LOC[@]}" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"}
  if ((WAIT)); then
    start=$SECONDS
    while :; do
      state=$(run_quiet "$GCLOUD" compute tpus queued-resources describe "$QR_ID" "${GCLOUD_LOC[@]}" \
        --format='value(state.state)')
      if [[ $DRY_RUN == 1 ]]; then
        break
      fi
      echo "queued resource $QR_ID: ${state:-unknown} ($((SECONDS - start))s)"
      case $state in
        ACTIVE) break ;;
        FAILED | SUSPENDED) echo "$PROG: queued resource $QR_ID is $state" >&2; exit 1 ;;
      esac
      if ((SECONDS - start >= WAIT_TIMEOUT)); then
        echo "$PROG: queued resource $QR_ID not ACTIVE after ${WAIT_TIMEOUT}s (last state: ${state:-unknown})" >&2
        exit 1
      fi
      sleep "$POLL"
    done
  fi
else
  run "$GCLOUD" compute tpus tpu-vm create "$NAME" "${GCLOUD_LOC[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"}
fi
