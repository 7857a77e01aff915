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

# debian_arch <arch>: Debian's name for the architecture (x86_64 -> amd64,
# aarch64 -> arm64); fails for any other, naming <usage>.
debian_arch() {
	case "$1" in
	x86_64) echo amd64 ;;
	aarch64) echo arm64 ;;
	*) die "usage: $2 x86_64|aarch64" ;;
	esac
}

# distro_apt_init <debarch>: a private apt set-up for Debian trixie's
# <debarch> (amd64, arm64) packages, with backports and security, in
# $RASVMM_CACHE/apt-distro-<debarch> (the machine's apt configuration is not
# touched). Sets `apt_opts` and `apt_dir`; updates the lists once a day at
# most, so a warm run needs no network.
distro_apt_init() {
	local debarch=$1 mirror security keyring stamp
	apt_dir="$RASVMM_CACHE/apt-distro-$debarch"
	mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
	mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
		grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true)
	mirror=${mirror:-http://deb.debian.org/debian}
	security=${mirror%/debian*}/debian-security
	keyring=/usr/share/keyrings/debian-archive-keyring.gpg
	[ -r "$keyring" ] || die "$keyring is missing: install debian-archive-keyring"
	cat >"$apt_dir/sources.list" <<LIST
deb [arch=$debarch signed-by=$keyring] $mirror trixie main
deb [arch=$debarch signed-by=$keyring] $mirror trixie-backports main
deb [arch=$debarch signed-by=$keyring] $security trixie-security main
LIST
	touch "$apt_dir/status"
	apt_opts=(-o "APT::Architecture=$debarch" -o "APT::Architectures::=$debarch"
		-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
		-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
		-o "Dir::Cache::archives=$apt_dir/archives" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
		-o "APT::Get::List-Cleanup=0")
	[ "$(id -u)" != 0 ] || apt_opts+=(-o "APT::Sandbox::User=root")
	stamp="$apt_dir/updated"
	if [ -z "$(find "$stamp" -mmin -1440 2>/dev/null)" ]; then
		log "apt-get update for Debian trixie $debarch (private lists: $apt_dir)"
		if apt-get "${apt_opts[@]}" update -qq >"$apt_dir/update.log" 2>&1; then
			touch "$stamp"
		elif [ ! -e "$stamp" ]; then
			die "apt-get update failed; see $apt_dir/update.log"
		else
			log "apt-get update failed (see $apt_dir/update.log); using yesterday's lists"
		fi
	fi
}

# elf_closure <tree> <root> <multiarch> <elf path...>: copies each ELF (a
# path inside the unpacked package tree <tree>), its dynamic loader and the
# DT_NEEDED closure of its libraries, resolved in the loader's multiarch
# directories (/lib/<multiarch>, /usr/lib/<multiarch>), to the same paths
# under <root>. A path the packages carry only under /usr (merged /usr: the
# loader's /lib64 is base-files' symlink) is taken from there. A library no
# package in <tree> carries is an error naming it.
elf_closure() {
	local tree=$1 root=$2 multiarch=$3 elf so path interp d
	shift 3
	has() { [ -e "$tree$1" ] || [ -e "$tree/usr$1" ]; }
	keep() {
		local src=$tree$1
		[ -e "$src" ] || src=$tree/usr$1
		mkdir -p "$root$(dirname "$1")"
		cp -L "$src" "$root$1"
	}
	local queue=() seen=" "
	for elf in "$@"; do
		has "$elf" || die "$elf is in none of the unpacked packages"
		keep "$elf"
		queue+=("$root$elf")
		interp=$(readelf -l "$tree$elf" | sed -n 's/.*interpreter: \(.*\)]/\1/p')
		if [ -n "$interp" ] && [ "${seen#* $interp }" = "$seen" ]; then
			has "$interp" || die "the dynamic loader $interp is not in the unpacked packages"
			keep "$interp"
			seen="$seen$interp "
		fi
	done
	while [ ${#queue[@]} -gt 0 ]; do
		elf=${queue[0]}
		queue=("${queue[@]:1}")
		for so in $(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
			[ "${seen#* $so }" = "$seen" ] || continue
			seen="$seen$so "
			path=""
			for d in /lib/$multiarch /usr/lib/$multiarch; do
				[ -e "$tree$d/$so" ] && path=$d/$so && break
			done
			[ -n "$path" ] || ! has "/lib/$multiarch/$so" || path=/lib/$multiarch/$so
			[ -n "$path" ] || die "$so (needed by $(basename "$elf")) is in none of the unpacked packages"
			keep "$path"
			queue+=("$root$path")
		done
	done
}
