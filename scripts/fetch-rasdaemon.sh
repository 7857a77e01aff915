#!/usr/bin/env bash
# Prints the path of a root tree holding Debian trixie's rasdaemon for ARCH's
# guest (x86_64 or aarch64): /usr/sbin/rasdaemon and /usr/bin/sqlite3 (a
# rasdaemon dependency; rasvmm's agent reads rasdaemon's database with it),
# their dynamic loader and every shared library they need, at the paths the
# loader searches. The rasdaemon guest image is the guest initramfs plus this
# tree (build-images.sh).
#
# Packages come through the private apt set-up of distro_apt_init (lib.sh):
# rasdaemon, sqlite3 and the library packages their dependencies reach
# (not perl: ras-mc-ctl is not carried). Only the ELF closure of the two
# binaries is kept. Cached in $RASVMM_CACHE/rasdaemon/<arch>/ (refresh with
# RASVMM_REFRESH_RASDAEMON=1).
source "$(dirname "$0")/lib.sh"

arch=${1:-}
debarch=$(debian_arch "$arch" fetch-rasdaemon.sh) || exit 1
multiarch=$arch-linux-gnu

dir="$RASVMM_CACHE/rasdaemon/$arch"
root="$dir/root"
if [ -x "$root/usr/sbin/rasdaemon" ] && [ -z "${RASVMM_REFRESH_RASDAEMON:-}" ]; then
	echo "$root"
	exit 0
fi

distro_apt_init "$debarch"
version=$(apt-cache "${apt_opts[@]}" policy rasdaemon | awk '/Candidate:/ {print $2}')
[ -n "$version" ] && [ "$version" != "(none)" ] || die "Debian trixie ($debarch) has no rasdaemon"
# The library packages rasdaemon and sqlite3 depend on, and theirs.
libs=$(apt-cache "${apt_opts[@]}" depends rasdaemon sqlite3 |
	awk '$1 == "Depends:" && $2 ~ /^(lib|zlib1g)/ {print $2}' | grep -v perl | sort -u)
pkgs=$(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
	--no-breaks --no-replaces --no-enhances $libs | grep -E '^(lib|zlib1g)' | grep -v perl | sort -u)
log "downloading rasdaemon $version, sqlite3 and $(echo "$pkgs" | wc -w) library packages ($debarch)"
rm -rf "$dir/debs"
mkdir -p "$dir/debs"
(cd "$dir/debs" && apt-get "${apt_opts[@]}" download -qq "rasdaemon=$version" sqlite3 $pkgs 2>&1 |
	grep -v unsandboxed >&2) || true
ls "$dir/debs/"rasdaemon_*.deb "$dir/debs/"sqlite3_*.deb >/dev/null 2>&1 ||
	die "apt-get download of rasdaemon $version and sqlite3 ($debarch) failed"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for deb in "$dir/debs"/*.deb; do
	dpkg-deb -x "$deb" "$tmp/all"
done
rm -rf "$root.tmp"
elf_closure "$tmp/all" "$root.tmp" "$multiarch" /usr/sbin/rasdaemon /usr/bin/sqlite3
rm -rf "$root"
mv "$root.tmp" "$root"
echo "$version" >"$dir/VERSION"
log "rasdaemon $version ($debarch): $(find "$root" -type f | wc -l) files, $(du -sh "$root" | cut -f1)"
echo "$root"
