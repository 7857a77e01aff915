#!/usr/bin/env bash
# Fetches the distribution kernels of the built-in kernel matrix
# (scenarios/matrix/<arch>.toml) for ARCH (x86_64 or aarch64): Debian's
# cloud kernel images, unpatched, through a private sources list and lists
# directory (the machine's apt configuration is not touched), kernel image
# only:
#   debian-7.3-cloud   the newest linux-binary-7.3.*-cloud-<arch> in
#                      trixie-backports (the series rasvmm's patches target);
#   debian-6.12-cloud  the newest linux-image-6.12.*-cloud-<arch>-unsigned in
#                      trixie and trixie-security (the LTS kernel, without
#                      vm.panic_on_unrecoverable_memory_failure).
# Each lands in target/images/distro/<arch>/<name>, its package version next
# to it in <name>.version; downloads are cached in $RASVMM_CACHE/distro-kernels.
# A suite that no longer carries a series is an error naming what it has.
source "$(dirname "$0")/lib.sh"
arch=${1:-}
debarch=$(debian_arch "$arch" fetch-distro-kernels.sh) || exit 1

cache="$RASVMM_CACHE/distro-kernels/$arch"
out="$RASVMM_ROOT/target/images/distro/$arch"
mkdir -p "$cache" "$out"
distro_apt_init "$debarch"

# fetch <name> <package regex>: the newest package matching, its kernel image.
fetch() {
	local name=$1 pattern=$2 pkg version file tmp img
	pkg=$(apt-cache "${apt_opts[@]}" pkgnames linux- 2>/dev/null | grep -E "^$pattern\$" | sort -V | tail -n1 || true)
	if [ -z "$pkg" ]; then
		local have
		have=$(apt-cache "${apt_opts[@]}" pkgnames linux- 2>/dev/null | grep -E "cloud-$debarch(-unsigned)?\$" |
			grep -E '^linux-(binary|image)-[0-9]' | sort -V | tail -n6 | tr '\n' ' ')
		die "no package matches $pattern for $name (the suites have: ${have:-nothing})"
	fi
	version=$(apt-cache "${apt_opts[@]}" policy "$pkg" | awk '/Candidate:/ {print $2}')
	file="$cache/${pkg}_${version}.img"
	if [ ! -s "$file" ]; then
		log "downloading $pkg $version"
		tmp=$(mktemp -d)
		(cd "$tmp" && apt-get "${apt_opts[@]}" download -qq "$pkg=$version" 2>&1 | grep -v unsandboxed >&2) || true
		ls "$tmp"/*.deb >/dev/null 2>&1 || die "apt-get download $pkg=$version failed"
		dpkg-deb -x "$tmp"/*.deb "$tmp/x"
		img=$(find "$tmp/x" -name 'vmlinuz*' -type f | head -n1)
		[ -n "$img" ] || die "$pkg has no vmlinuz"
		mv "$img" "$file.tmp"
		mv "$file.tmp" "$file"
		rm -rf "$tmp"
	fi
	cp "$file" "$out/$name.tmp"
	mv "$out/$name.tmp" "$out/$name"
	echo "$pkg $version" >"$out/$name.version"
	echo "$out/$name: $pkg $version"
}

fetch debian-7.3-cloud "linux-binary-7\.3\.[0-9]+\+deb13-cloud-$debarch"
fetch debian-6.12-cloud "linux-image-6\.12\.[0-9]+\+deb13-cloud-$debarch-unsigned"
