# shellcheck shell=bash
# Common settings for rasvmm's set-up scripts. Sourced, never run.
#
# Everything built or downloaded lives in the cache, outside the repository,
# so a clean clone on a warm machine reuses it: RASVMM_CACHE, default
# ~/.cache/rasvmm.

set -euo pipefail

RASVMM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RASVMM_CACHE=${RASVMM_CACHE:-$HOME/.cache/rasvmm}
mkdir -p "$RASVMM_CACHE"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs "$@" only if the stamp file for key $1 is missing; then writes it.
# Usage: once <stamp-name> <command...>
once() {
	local stamp="$RASVMM_CACHE/stamps/$1"
	shift
	[ -e "$stamp" ] && return 0
	"$@"
	mkdir -p "$(dirname "$stamp")"
	touch "$stamp"
}
