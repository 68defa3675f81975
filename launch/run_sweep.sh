#!/usr/bin/env bash
# shellcheck disable=SC2088,SC2016  # ~ and $HOME in remote paths expand on the workers, not here
# Run the retrieval-head sweep on every worker of a TPU VM / pod slice. See launch/README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/run_sweep.sh --name NAME --zone ZONE --config CONFIG --workdir DIR [--project P]
                           [--worker all|N] [--env KEY=VALUE]... [--foreground] [--module M]
                           [--[no_]distributed] [--remote_dir DIR] [--venv DIR] [--log_dir DIR]
                           [--ssh_flag FLAG]... [--dry_run]
                           [-- EXTRA_FLAGS...]
       launch/run_sweep.sh --name NAME --zone ZONE --stop | --status [--module M]

Starts `python -m rhead_jax.sweep --config CONFIG --workdir DIR --distributed EXTRA_FLAGS...` on
every worker at once (gcloud compute tpus tpu-vm ssh --worker=all). Multi-host slices run the same
command on each host: one JAX process per host, joined by jax.distributed.initialize() (the sweep's
--distributed flag; its settings come from the TPU environment); process 0 writes the results, so
give a shared --workdir (gs://...) on a pod. Each worker logs to
LOG_DIR/sweep-worker<N>.log (appended; its pid goes to sweep-worker<N>.pid) under nohup, so the run
survives a dropped ssh connection; --foreground streams the log and waits instead.

  --name NAME        TPU name ($TPU_NAME)                                            [required]
  --zone ZONE        zone ($TPU_ZONE)                                                [required]
  --config CONFIG    config file: a bare name from configs/ (yi34b.py) or a path in the repo [required]
  --workdir DIR      output directory, gs://bucket/dir or a path on the workers     [required]
  --project P        GCP project ($TPU_PROJECT)
  --worker W         all (default) or one worker index
  --env KEY=VALUE    environment variable for the run (repeatable)
  --foreground       stream the workers' logs and wait for the end (default: start and return)
  --stop             stop the runs started earlier (kills the pids in LOG_DIR/*-worker*.pid)
  --status           exit 0 when the module's run is alive on every worker, 3 when it is not on one
                     (keep_running.sh polls it)
  --module M         the entry point: rhead_jax.sweep (default), rhead_jax.ablate, rhead_jax.mixedkv,
                     rhead_jax.gates, rhead_jax.detectors (all take --config, --workdir, --distributed)
  --distributed      pass --distributed to the entry point; the default with --worker all, for every
                     module: each host joins jax.distributed before it touches a device (safe on one
                     host too)
  --no_distributed   never pass it (the default for one --worker: it would wait for the others)
  --remote_dir DIR   the code on the workers, the run's working directory (default ~/rhead_jax)
  --venv DIR         the workers' venv (default ~/rhead_venv, as install.sh makes it)
  --log_dir DIR      log directory on the workers (default ~/rhead_logs)
  --ssh_flag FLAG    one more flag for gcloud's tpu-vm ssh (repeatable; $TPU_SSH_FLAGS), e.g.
                     --ssh_flag=--internal-ip
  --dry_run          print the gcloud command, run nothing
  -h, --help         this help
  -- FLAGS...        passed to the Python entry point (e.g. --config.sweep.batch_size=8);
                     --config.* flags may also be given before --

Examples:
  launch/run_sweep.sh --name rhead-v4 --zone us-central2-b --config yi34b.py \
      --workdir gs://my-bucket/yi34b -- --config.model.path=/mnt/ckpt/Yi-34B-200K
  launch/run_sweep.sh --name rhead-v4 --zone us-central2-b --stop
EOF
}

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
CONFIG=""
WORKDIR=""
WORKER=all
ENVS=()
FOREGROUND=0
STOP=0
STATUS=0
MODULE=rhead_jax.sweep
DISTRIBUTED=auto
REMOTE_DIR='~/rhead_jax'
VENV='~/rhead_venv'
LOG_DIR='~/rhead_logs'
PASS=()

while (($#)); do
  if shared_flag "$@"; then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --config | --config=*) take "$@"; CONFIG=$VAL; shift "$SHIFT" ;;
    --workdir | --workdir=*) take "$@"; WORKDIR=$VAL; shift "$SHIFT" ;;
    --worker | --worker=*) take "$@"; WORKER=$VAL; shift "$SHIFT" ;;
    --env | --env=*) take "$@"; ENVS+=("$VAL"); shift "$SHIFT" ;;
    --module | --module=*) take "$@"; MODULE=$VAL; shift "$SHIFT" ;;
    --remote_dir | --remote_dir=*) take "$@"; REMOTE_DIR=$VAL; shift "$SHIFT" ;;
    --venv | --venv=*) take "$@"; VENV=$VAL; shift "$SHIFT" ;;
    --log_dir | --log_dir=*) take "$@"; LOG_DIR=$VAL; shift "$SHIFT" ;;
    --foreground) FOREGROUND=1; shift ;;
    --stop) STOP=1; shift ;;
    --status) STATUS=1; shift ;;
    --distributed) DISTRIBUTED=yes; shift ;;
    --no_distributed) DISTRIBUTED=no; shift ;;
    --config.*) PASS+=("$1"); shift ;;
    --) shift; PASS+=("$@"); break ;;
    *) die "unknown argument '$1' (pass flags for $MODULE after --)" ;;
  esac
done

require "$NAME" --name TPU_NAME
require "$ZONE" --zone TPU_ZONE
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be 'all' or a worker index, got '$WORKER'"
[[ $MODULE =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "--module '$MODULE' is not a Python module name"
check_remote_path "$REMOTE_DIR" --remote_dir
check_remote_path "$VENV" --venv
check_remote_path "$LOG_DIR" --log_dir
set_location
TAG=${MODULE##*.}
PIDS="$LOG_DIR/$TAG-worker"

if ((STOP)); then
  REMOTE="for f in $PIDS*.pid; do [ -f \"\$f\" ] || continue; p=\$(cat \"\$f\");"
  REMOTE+=" if kill \"\$p\" 2>/dev/null; then echo \"\$(hostname): stopped pid \$p (\$f)\"; fi; rm -f \"\$f\"; done"
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOC[@]}" --worker="$WORKER" \
    ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --command="$REMOTE"
  exit 0
fi

if ((STATUS)); then
  REMOTE="W=\$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)"
  REMOTE+="; PIDF=$PIDS\$W.pid; if [ -f \$PIDF ] && kill -0 \$(cat \$PIDF) 2>/dev/null; then echo \"worker \$W: $MODULE running\"; else echo \"worker \$W: $MODULE not running\"; exit 3; fi"
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOC[@]}" --worker="$WORKER" \
    ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --command="$REMOTE"
  exit 0
fi

require "$CONFIG" --config
require "$WORKDIR" --workdir
if [[ $WORKDIR != gs://* && $WORKER == all ]]; then
  echo "$PROG: note: --workdir $WORKDIR is on the workers' own disks; on a multi-host slice use gs://" \
    "(process 0 writes the results; fetch them from worker 0 with fetch_results.sh --name)" >&2
fi

ENV_PREFIX=""
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '$kv'"
  ENV_PREFIX+=" ${kv%%=*}=$(quote "${kv#*=}")"
done
if [[ $DISTRIBUTED == auto ]]; then
  if [[ $WORKER == all ]]; then DISTRIBUTED=yes; else DISTRIBUTED=no; fi
fi
DIST_FLAG=()
if [[ $DISTRIBUTED == yes ]]; then DIST_FLAG=(--distributed); fi
CMD="$VENV/bin/python -m $MODULE $(quote --config="$CONFIG" --workdir="$WORKDIR" ${DIST_FLAG[@]+"${DIST_FLAG[@]}"} \
  ${PASS[@]+"${PASS[@]}"})"
if [[ -n $ENV_PREFIX ]]; then
  CMD="env$ENV_PREFIX $CMD"
fi

# Each worker: its index from the TPU metadata server (hostname as a fallback), refuse to start
# over a run that is still going, then start the command detached (or stream it in --foreground).
REMOTE="set -e; mkdir -p $LOG_DIR; cd $REMOTE_DIR"
REMOTE+="; W=\$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)"
REMOTE+="; LOG=$PIDS\$W.log; PIDF=$PIDS\$W.pid"
REMOTE+="; if [ -f \$PIDF ] && kill -0 \$(cat \$PIDF) 2>/dev/null; then echo \"worker \$W: a run is still going (pid \$(cat \$PIDF)); stop it first: run_sweep.sh --stop\" >&2; exit 1; fi"
REMOTE+="; touch \$LOG; nohup $CMD >> \$LOG 2>&1 < /dev/null & P=\$!; echo \$P > \$PIDF"
REMOTE+="; echo \"worker \$W: started $MODULE, pid \$P, log \$LOG\""
if ((FOREGROUND)); then
  REMOTE+="; tail -n +1 --pid=\$P -f \$LOG; wait \$P"
fi

run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOC[@]}" --worker="$WORKER" \
  ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --command="$REMOTE"
