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

# arm64_apt_init: a private apt set-up for Debian's arm64 packages, in
# $RASVMM_CACHE/apt-arm64: its own sources list, lists directory, empty dpkg
# status and APT::Architecture=arm64, so the machine's own apt configuration,
# architectures and dpkg database are not touched (as in fetch-kernel.sh).
# Sets `apt_opts` (the options for apt-get and apt-cache), `apt_dir`, `mirror` and
# `codename`, and updates the lists once per shell.
arm64_apt_init() {
	[ -n "${arm64_apt_ready:-}" ] && return 0
	apt_dir="$RASVMM_CACHE/apt-arm64"
	mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
	# The machine's configured Debian mirror (one-line or deb822 format), else
	# the default; its release, so arm64 packages match the x86_64 ones.
	local keyring
	mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
		grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true)
	mirror=${mirror:-http://deb.debian.org/debian}
	codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
	codename=${codename:-bookworm}
	keyring=/usr/share/keyrings/debian-archive-keyring.gpg
	[ -r "$keyring" ] || die "$keyring is missing: install debian-archive-keyring"
	echo "deb [arch=arm64 signed-by=$keyring] $mirror $codename main" >"$apt_dir/sources.list"
	: >"$apt_dir/status"
	apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
		-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
		-o "Dir::Cache::archives=$apt_dir/archives" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
		-o "APT::Architecture=arm64" -o "APT::Architectures=arm64" -o "APT::Get::List-Cleanup=0")
	# As root, download as root: the private directories are not _apt's.
	[ "$(id -u)" != 0 ] || apt_opts+=(-o "APT::Sandbox::User=root")
	log "apt-get update ($codename arm64, private lists: $apt_dir)"
	apt-get "${apt_opts[@]}" update -qq >"$apt_dir/update.log" 2>&1 ||
		die "apt-get update of $codename (arm64) failed; see $apt_dir/update.log"
	arm64_apt_ready=1
}
