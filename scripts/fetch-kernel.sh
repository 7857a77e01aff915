#!/usr/bin/env bash
# Fetches Debian's linux-source-7.3 package (trixie-backports) into the cache
# through a private sources list and lists directory: the machine's own apt
# configuration is not touched. Prints the path of the source tarball.
#
# The suite moves on with 7.3.x point releases; the current one is accepted
# and its version is recorded next to the tarball. A suite that no longer
# carries linux-source-7.3 is an error naming what it does carry.
source "$(dirname "$0")/lib.sh"

dir="$RASVMM_CACHE/linux-source"
mkdir -p "$dir"
existing=$(ls "$dir"/linux-source-7.3_*.tar.xz 2>/dev/null | sort -V | tail -n1 || true)
if [ -n "$existing" ] && [ -z "${RASVMM_REFRESH_KERNEL:-}" ]; then
	echo "$existing"
	exit 0
fi

apt_dir="$RASVMM_CACHE/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
# The machine's configured Debian mirror (one-line or deb822 format), else the default.
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
	grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true)
mirror=${mirror:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || die "$keyring is missing: install debian-archive-keyring"
echo "deb [signed-by=$keyring] $mirror trixie-backports main" >"$apt_dir/sources.list"

apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
	-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::archives=$apt_dir/archives"
	-o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o "APT::Get::List-Cleanup=0")
log "apt-get update (private lists: $apt_dir)"
apt-get "${apt_opts[@]}" update -qq >"$apt_dir/update.log" 2>&1 ||
	die "apt-get update of trixie-backports failed; see $apt_dir/update.log"
if ! apt-cache "${apt_opts[@]}" show linux-source-7.3 >/dev/null 2>&1; then
	avail=$(apt-cache "${apt_opts[@]}" pkgnames linux-source- 2>/dev/null | sort -V | tr '\n' ' ')
	die "trixie-backports has no linux-source-7.3 (it has: ${avail:-nothing}); rasvmm's patches target 7.3"
fi
version=$(apt-cache "${apt_opts[@]}" policy linux-source-7.3 | awk '/Candidate:/ {print $2}')
log "downloading linux-source-7.3 $version (~166 MB)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get "${apt_opts[@]}" download -qq "linux-source-7.3=$version") ||
	die "apt-get download linux-source-7.3=$version failed"
deb=$(ls "$tmp"/linux-source-7.3_*.deb)
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" ./usr/src/linux-source-7.3.tar.xz
out="$dir/linux-source-7.3_${version}.tar.xz"
mv "$tmp/usr/src/linux-source-7.3.tar.xz" "$out"
echo "$version" >"$dir/VERSION"
echo "$out"
