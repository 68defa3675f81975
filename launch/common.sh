# shellcheck shell=bash disable=SC2034  # VAL and SHIFT are read by the sourcing script
# Helpers shared by launch/*.sh. Sourced, never run: flag parsing, required-flag checks, and `run`,
# which prints a command (shell-quoted, ready to copy) before running it, or only prints it under
# --dry_run.
#
# Environment read by every script:
#   GCLOUD          the gcloud executable (default: gcloud on PATH)
#   DRY_RUN         1 = print the commands, run none of them (same as --dry_run)
#   TPU_SSH_FLAGS   gcloud flags for every `tpu-vm ssh` / `tpu-vm scp` any script runs, split on
#                   whitespace, e.g. "--internal-ip" or "--tunnel-through-iap" (same as --ssh_flag,
#                   repeatable, which every script accepts; scripts that never ssh ignore them)
#
# The one way to give gcloud flags: --ssh_flag (connections to the workers, every script) and
# --create_flag (create_tpu.sh, keep_running.sh: flags of `tpu-vm create` / `queued-resources create`
# such as --network, --service-account, --internal-ips). gcloud-wide settings (account, project,
# impersonation) come from `gcloud config set` / CLOUDSDK_* as for any gcloud command.

GCLOUD=${GCLOUD:-gcloud}
DRY_RUN=${DRY_RUN:-0}
PROG=$(basename "$0")
SSH_FLAGS=()
if [[ -n ${TPU_SSH_FLAGS:-} ]]; then
  read -r -a SSH_FLAGS <<<"$TPU_SSH_FLAGS"
fi

die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for the flags." >&2
  exit 2
}

# take "$@": the value of `--flag=value` or `--flag value`; sets VAL and SHIFT (how many args to drop).
take() {
  if [[ $1 == --*=* ]]; then
    VAL=${1#*=}
    SHIFT=1
  elif (($# >= 2)); then
    VAL=$2
    SHIFT=2
  else
    die "$1 needs a value"
  fi
}

# shared_flag "$@": the flags every script takes (--name --zone --project --ssh_flag --dry_run);
# when $1 is one of them, sets it, sets SHIFT (how many args it used) and returns 0; else returns 1.
shared_flag() {
  case $1 in
    --name | --name=*) take "$@"; NAME=$VAL ;;
    --zone | --zone=*) take "$@"; ZONE=$VAL ;;
    --project | --project=*) take "$@"; PROJECT=$VAL ;;
    --ssh_flag | --ssh_flag=*) take "$@"; check_gcloud_flag "$VAL" --ssh_flag; SSH_FLAGS+=("$VAL") ;;
    --dry_run | --dry-run) DRY_RUN=1; SHIFT=1 ;;
    *) return 1 ;;
  esac
}

# require VALUE FLAG [ENV]: die with a clear message when a required setting is empty.
require() {
  if [[ -z $1 ]]; then
    if [[ -n ${3:-} ]]; then
      die "missing required flag $2 (or set \$$3)"
    fi
    die "missing required flag $2"
  fi
}

# quote ARGS...: the args as one line a shell reads back as the same argv.
quote() {
  local a v out=()
  for a in "$@"; do
    if [[ -n $a && $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$a")
    elif [[ $a =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value'
      v=${BASH_REMATCH[2]}
      out+=("${BASH_REMATCH[1]}'${v//\'/\'\\\'\'}'")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# run CMD ARGS...: print `+ CMD ARGS` (stdout), then run it unless DRY_RUN=1.
run() {
  printf '+ %s' "$(quote "$@")"
  printf '\n'
  if [[ $DRY_RUN == 1 ]]; then
    return 0
  fi
  "$@"
}

# run_quiet CMD ARGS...: like run, but prints the command on stderr (for use inside $(...)).
run_quiet() {
  printf '+ %s\n' "$(quote "$@")" >&2
  if [[ $DRY_RUN == 1 ]]; then
    return 0
  fi
  "$@"
}

# check_remote_path VALUE FLAG: remote paths go into the remote command unquoted (so ~ and $HOME
# expand on the worker); allow only characters that need no quoting.
check_remote_path() {
  if [[ ! $1 =~ ^[A-Za-z0-9_./~\$\{\}+-]+$ ]]; then
    die "$2 '$1': use a path without spaces or shell characters (~ and \$HOME are fine)"
  fi
}

# GCLOUD_LOC: the --zone (and --project) flags every TPU command gets; call after parsing.
set_location() {
  GCLOUD_LOC=(--zone="$ZONE")
  if [[ -n ${PROJECT:-} ]]; then
    GCLOUD_LOC+=(--project="$PROJECT")
  fi
}

# check_gcloud_flag VALUE FLAG: --ssh_flag / --create_flag values are gcloud flags (--name[=value]).
check_gcloud_flag() {
  [[ $1 == --?* ]] || die "$2 '$1': give one gcloud flag, e.g. $2=--internal-ip"
}

# accelerator_type NAME: the name `--accelerator-type` takes. Cloud TPU spells v5e slices
# v5litepod-N (https://cloud.google.com/tpu/docs/v5e); v5e-N is accepted and mapped, with a note.
accelerator_type() {
  case $1 in
    v5e-*)
      echo "$PROG: note: Cloud TPU calls v5e slices v5litepod-N; using --accelerator-type=v5litepod-${1#v5e-}" >&2
      echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}
