#!/usr/bin/env bash
# Prints the path of a static busybox for an architecture's initramfs
# (x86_64, aarch64). x86_64 uses the machine's busybox-static package. For
# aarch64, Debian's arm64 busybox-static .deb is fetched through a private
# sources list, lists directory and APT::Architecture=arm64 (the machine's own
# apt configuration, architectures and dpkg database are not touched, as in
# fetch-kernel.sh) and its binary kept in the cache, $RASVMM_CACHE/busybox/aarch64/.
source "$(dirname "$0")/lib.sh"

arch=${1:-x86_64}
case "$arch" in
x86_64)
	busybox=$(command -v busybox || true)
	[ -n "$busybox" ] && file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
		busybox=/bin/busybox
	[ -x "$busybox" ] || die "busybox-static is missing: run scripts/install-deps.sh"
	echo "$busybox"
	exit 0
	;;
aarch64) ;;
*) die "unsupported busybox arch '$arch' (supported: x86_64, aarch64)" ;;
esac

dir="$RASVMM_CACHE/busybox/aarch64"
if [ -x "$dir/busybox" ] && [ -z "${RASVMM_REFRESH_BUSYBOX:-}" ]; then
	echo "$dir/busybox"
	exit 0
fi

apt_dir="$RASVMM_CACHE/apt-arm64"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$dir"
# The machine's configured Debian mirror (one-line or deb822 format), else the
# default; its release, so the arm64 busybox matches the x86_64 one.
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
version=$(apt-cache "${apt_opts[@]}" policy busybox-static | awk '/Candidate:/ {print $2}')
[ -n "$version" ] && [ "$version" != "(none)" ] ||
	die "$codename (arm64) at $mirror has no busybox-static"
log "downloading busybox-static:arm64 $version"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get "${apt_opts[@]}" download -qq "busybox-static:arm64=$version") ||
	die "apt-get download busybox-static:arm64=$version failed"
deb=$(ls "$tmp"/busybox-static_*_arm64.deb)
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" ./bin/busybox
file "$tmp/bin/busybox" | grep -q 'ARM aarch64.*statically linked' ||
	die "the busybox in $(basename "$deb") is not a static aarch64 binary: $(file -b "$tmp/bin/busybox")"
cp "$deb" "$dir/"
install -m 0755 "$tmp/bin/busybox" "$dir/busybox.tmp"
mv "$dir/busybox.tmp" "$dir/busybox"
echo "$version" >"$dir/VERSION"
echo "$dir/busybox"
