# shellcheck shell=bash
# Shared by the TPU/GPU scripts (sourced): run CMD... runs it, or with DRY_RUN=1 prints it
# shell-quoted after "+ "; die prints one error line and exits 2.

_q() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local first=1 a
  for a in "$@"; do
    [ $first = 1 ] || printf ' '
    first=0
    _q "$a"
  done
}

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '+ %s\n' "$(quote_all "$@")"
  else
    printf '+ %s\n' "$(quote_all "$@")" >&2
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# Prints the comment block at the top of the calling script (its usage text).
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
