#!/usr/bin/env bash
# Prints the path of a static busybox for an architecture's initramfs
# (x86_64, aarch64). x86_64 uses the machine's busybox-static package. For
# aarch64, Debian's arm64 busybox-static .deb is fetched with arm64_apt_init's
# private apt set-up (lib.sh) and its binary kept in the cache,
# $RASVMM_CACHE/busybox/aarch64/.
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

mkdir -p "$dir"
arm64_apt_init
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
