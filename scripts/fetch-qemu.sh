#!/usr/bin/env bash
# Prints the path of a root tree holding Debian's arm64 qemu-system-aarch64
# with its dynamic loader and every shared library it needs, at the paths the
# loader searches (usr/bin/qemu-system-aarch64, lib/ld-linux-aarch64.so.1,
# lib/aarch64-linux-gnu/..., usr/lib/aarch64-linux-gnu/...), for the aarch64
# bench lab host: the host's own qemu-system-aarch64 is an x86_64 binary.
# Usage: fetch-qemu.sh aarch64.
#
# The packages come through arm64_apt_init's private apt set-up (lib.sh):
# qemu-system-arm of the machine's Debian release (the same QEMU version as
# the host's) and the library packages its dependencies reach; the .debs are
# unpacked in a scratch tree and only the libraries the binary's DT_NEEDED
# chain names are kept. QEMU's `-M virt -kernel` needs no firmware files, so
# none are taken. Cached in $RASVMM_CACHE/qemu/aarch64/ (refresh with
# RASVMM_REFRESH_QEMU=1).
source "$(dirname "$0")/lib.sh"

arch=${1:-aarch64}
[ "$arch" = aarch64 ] || die "fetch-qemu.sh fetches only the aarch64 QEMU (the x86_64 one is the host's)"

dir="$RASVMM_CACHE/qemu/aarch64"
root="$dir/root"
if [ -x "$root/usr/bin/qemu-system-aarch64" ] && [ -z "${RASVMM_REFRESH_QEMU:-}" ]; then
	echo "$root"
	exit 0
fi

arm64_apt_init
version=$(apt-cache "${apt_opts[@]}" policy qemu-system-arm | awk '/Candidate:/ {print $2}')
[ -n "$version" ] && [ "$version" != "(none)" ] ||
	die "$codename (arm64) at $mirror has no qemu-system-arm"
# The library packages qemu-system-arm depends on, and theirs (not
# qemu-system-common's or -data's: tools, firmware and data the bench does not use).
libs=$(apt-cache "${apt_opts[@]}" depends qemu-system-arm |
	awk '$1 == "Depends:" && $2 ~ /^(lib|zlib1g)/ {print $2}')
pkgs=$(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
	--no-breaks --no-replaces --no-enhances $libs | grep -E '^(lib|zlib1g)' | sort -u)
log "downloading qemu-system-arm:arm64 $version and $(echo "$pkgs" | wc -w) library packages"
mkdir -p "$dir/debs"
(cd "$dir/debs" && apt-get "${apt_opts[@]}" download -qq "qemu-system-arm:arm64=$version" \
	$(printf '%s:arm64 ' $pkgs)) || die "apt-get download of qemu-system-arm:arm64 and its libraries failed"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for deb in "$dir/debs"/*.deb; do
	dpkg-deb -x "$deb" "$tmp/all"
done
qemu="$tmp/all/usr/bin/qemu-system-aarch64"
file "$qemu" | grep -q 'ARM aarch64.*dynamically linked' ||
	die "qemu-system-arm:arm64 $version has no aarch64 qemu-system-aarch64: $(file -b "$qemu")"

rm -rf "$root.tmp"
elf_closure "$tmp/all" "$root.tmp" aarch64-linux-gnu /usr/bin/qemu-system-aarch64
rm -rf "$root"
mv "$root.tmp" "$root"
echo "$version" >"$dir/VERSION"
log "arm64 QEMU $version: $(find "$root" -type f | wc -l) files, $(du -sh "$root" | cut -f1)"
echo "$root"
