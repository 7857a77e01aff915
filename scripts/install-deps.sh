#!/usr/bin/env bash
# Installs what rasvmm's builds and tests need on a Debian machine, only what
# is missing: QEMU (the lab host), busybox-static (initramfs), the kernel
# build tools, Rust's x86_64-unknown-linux-musl target (static binaries), and
# cargo-fuzz (the parsers' fuzz targets).
source "$(dirname "$0")/lib.sh"

packages=(qemu-system-x86 busybox-static flex bison bc libelf-dev libssl-dev cpio xz-utils
	gzip file make gcc binutils debian-archive-keyring)
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
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed"
fi

command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
if ! command -v cargo-fuzz >/dev/null; then
	log "installing cargo-fuzz (about a minute)"
	cargo install --quiet --locked cargo-fuzz || die "cargo install cargo-fuzz failed"
fi
if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
	log "adding Rust target x86_64-unknown-linux-musl"
	rustup target add x86_64-unknown-linux-musl >/dev/null ||
		die "rustup target add x86_64-unknown-linux-musl failed"
fi
