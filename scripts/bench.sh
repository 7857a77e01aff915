#!/usr/bin/env bash
# Benchmarks, for both architectures' guests: rasvmm against QEMU in one lab-host
# run each, printed as ratios (boot to agent ready, on the project's kernel
# with the default and the rasdaemon guest image and, for x86_64, on the
# kernel matrix's distribution kernels; a page going bad under a
# process to its SIGBUS, which QEMU cannot reach, and what QEMU did instead;
# on x86_64 also machine-check injection to the guest's panic), rasvmm's
# action-optional reports of the same page against each other (x86_64:
# GHES-NMI, MCE SRAO Intel and AMD; aarch64: GHES GSIV and polled), the lab
# host's memory failing under a guest page (a user page with early kill on
# and off, a slab page) to each VMM's guest's verdict, and the KHO observer's
# scan speed against one read per page (this host).
# Record the figures in docs/benchmarks.md. Arguments: [--runs N].
source "$(dirname "$0")/lib.sh"
"$RASVMM_ROOT/scripts/install-deps.sh"
"$RASVMM_ROOT/scripts/build-images.sh" --bench x86_64 aarch64 >/dev/null
cd "$RASVMM_ROOT"
cargo build --quiet --release -p lab
lab="$RASVMM_ROOT/target/release/rasvmm-lab"
for arch in x86_64 aarch64; do
	RASVMM_BACKEND=lab "$lab" bench-boot --arch "$arch" "$@"
	# The rasdaemon guest image: rasdaemon started before the agent's hello.
	RASVMM_BACKEND=lab "$lab" bench-boot --arch "$arch" --image rasdaemon "$@"
	# The kernel matrix's distribution kernels (scenarios/matrix/), x86_64
	# only: on arm64 QEMU's agent needs virtio-mmio, a module in Debian's
	# kernels (docs/benchmarks.md).
	if [ "$arch" = x86_64 ]; then
		for k in debian-7.3-cloud debian-6.12-cloud; do
			RASVMM_BACKEND=lab "$lab" bench-boot --arch "$arch" --kernel "$k=target/images/distro/$arch/$k" "$@"
		done
	fi
	RASVMM_BACKEND=lab "$lab" bench-inject --arch "$arch" "$@"
	RASVMM_BACKEND=lab "$lab" bench-ghes --arch "$arch" "$@"
	RASVMM_BACKEND=lab "$lab" bench-host-poison --arch "$arch" "$@"
done
RASVMM_BACKEND=lab "$lab" bench-kho
