#!/usr/bin/env bash
# Installs what rasvmm's builds and tests need on a Debian machine, only what
# is missing: QEMU (the x86_64 and aarch64 lab hosts), busybox-static
# (initramfs; the arm64 one fetched into the cache by fetch-busybox.sh), the
# kernel build tools, the C compilers (the kernels, the rasdaemon image's shim)
# and the aarch64 cross compiler with its C library, Rust's
# x86_64-unknown-linux-musl and aarch64-unknown-linux-musl targets (static
# binaries), and cargo-fuzz (the parsers' fuzz targets).
source "$(dirname "$0")/lib.sh"

packages=(qemu-system-x86 qemu-system-arm busybox-static flex bison bc libelf-dev libssl-dev cpio xz-utils
	gzip file make gcc libc6-dev binutils gcc-aarch64-linux-gnu libc6-dev-arm64-cross debian-archive-keyring)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	command -v apt-get >/dev/null || die "apt-get not found; install: ${missing[*]}"
	sudo=""
	[ "$(id -u)" = 0 ] || sudo=sudo
	log "installing Debian packages: ${missing[*]}"
	$sudo apt-get update -qq
	# The QEMU packages of one source must be one version: a newer
	# qemu-utils (say from backports) Breaks the release's qemu-system-common,
	# and apt would refuse the install. Such packages are brought to the
	# version of the release's qemu-system-x86 (the lab hosts' QEMU, the
	# version every measurement in docs/ was made with), and said so.
	qemu=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
	pins=()
	while read -r pkg ver; do
		[ -n "$pkg" ] && [ -n "$qemu" ] && dpkg --compare-versions "$ver" gt "$qemu" || continue
		want=$(apt-cache madison "$pkg" | awk -v q="${qemu%+b*}" '{v=$3; sub(/\+b[0-9]+$/, "", v)} v == q {print $3; exit}')
		[ -n "$want" ] || die "$pkg $ver is installed, newer than $qemu: qemu-system-x86 $qemu cannot be installed beside it (remove $pkg, or install qemu-system-x86 and qemu-system-arm of $pkg's version)"
		log "$pkg $ver is newer than the release's QEMU $qemu and would break it: installing $pkg $want"
		pins+=("$pkg=$want")
	done < <(dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\n' 'qemu-*' 2>/dev/null | awk '$1 == "ii" {print $2, $3}')
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --allow-downgrades "${missing[@]}" "${pins[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} ${pins[*]} failed"
fi

command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
if ! command -v cargo-fuzz >/dev/null; then
	log "installing cargo-fuzz (about a minute)"
	cargo install --quiet --locked cargo-fuzz || die "cargo install cargo-fuzz failed"
fi
# aarch64 links with aarch64-linux-gnu-gcc (.cargo/config.toml).
for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
	if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
		log "adding Rust target $target"
		rustup target add "$target" >/dev/null || die "rustup target add $target failed"
	fi
done

# The arm64 busybox-static for the aarch64 images (cached; seconds when cold).
"$RASVMM_ROOT/scripts/fetch-busybox.sh" aarch64 >/dev/null
