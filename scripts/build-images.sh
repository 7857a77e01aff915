#!/usr/bin/env bash
# Builds everything a run needs, per architecture (x86_64, aarch64; both
# unless named: build-images.sh [--bench] [ARCH...]), and writes a manifest
# per architecture: target/images/manifest (x86_64) and
# target/images/aarch64/manifest:
#   - the kernel (scripts/build-kernel.sh ARCH, cached);
#   - static (musl) rasvmm and rasvmm-agent for ARCH;
#   - the guest initramfs: busybox-static + rasvmm-agent + images/guest-init
#     + the guest kernel as /boot/bzImage (aarch64: /boot/Image) for kexec;
#   - the rasdaemon guest initramfs: the same plus Debian's rasdaemon and
#     sqlite3 with their libraries (scripts/fetch-rasdaemon.sh);
#   - the lab-host initramfs: busybox-static + rasvmm + guest kernel and
#     both guest initramfs + images/lab-init.
#   - the distribution kernels of the kernel matrix, unpatched
#     (scripts/fetch-distro-kernels.sh ARCH: target/images/distro/ARCH/);
#   - with --bench, also the bench lab-host initramfs: the lab image plus
#     QEMU for ARCH (its libraries; x86_64: the host's QEMU and its firmware;
#     aarch64: Debian's arm64 QEMU from scripts/fetch-qemu.sh) and lab-timer,
#     so QEMU can be measured beside rasvmm in the same lab host.
# The images take seconds; the kernel is the slow part and is cached.
source "$(dirname "$0")/lib.sh"
bench=""
arches=()
for a in "$@"; do
	case "$a" in
	--bench) bench=1 ;;
	x86_64 | aarch64) arches+=("$a") ;;
	*) die "unknown argument '$a' (build-images.sh [--bench] [x86_64] [aarch64])" ;;
	esac
done
[ ${#arches[@]} -gt 0 ] || arches=(x86_64 aarch64)

images="$RASVMM_ROOT/target/images"

# pack <root dir> <output .cpio or .cpio.gz>
pack() {
	local compress=(gzip -6 -n)
	# The guest's initramfs stays uncompressed: unpacking 1.3 MB of gzip took
	# the nested guest over half a second, copying 4 MB takes rasvmm nothing.
	case "$2" in *.cpio) compress=(cat) ;; esac
	(cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --reproducible) |
		"${compress[@]}" >"$2.tmp"
	mv "$2.tmp" "$2"
}

# base_root <dir>: busybox and the directories an init needs.
base_root() {
	rm -rf "$1"
	mkdir -p "$1"/{bin,sbin,proc,sys,dev,tmp,etc}
	cp "$busybox" "$1/bin/busybox"
}

# bench_qemu <arch> <root>: QEMU for <arch>'s lab host into <root>, with its
# shared libraries and dynamic loader at the paths the loader expects.
bench_qemu() {
	local qemu interp lib
	case "$1" in
	x86_64)
		qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 is missing: run scripts/install-deps.sh"
		install -m 0755 "$qemu" "$2/bin/qemu-system-x86_64"
		ldd "$qemu" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
			mkdir -p "$2$(dirname "$lib")"
			cp -L "$lib" "$2$lib"
		done
		interp=$(readelf -l "$qemu" | sed -n 's/.*interpreter: \(.*\)]/\1/p')
		mkdir -p "$2$(dirname "$interp")"
		cp -L "$interp" "$2$interp"
		# Firmware for direct kernel boot (pc: SeaBIOS + linuxboot option ROM).
		mkdir -p "$2/usr/share/qemu"
		for f in /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin \
			/usr/share/qemu/kvmvapic.bin /usr/share/qemu/qboot.rom; do
			cp -L "$f" "$2/usr/share/qemu/"
		done
		;;
	aarch64)
		# The host's qemu-system-aarch64 is an x86_64 binary: Debian's arm64
		# one, its loader and libraries (-M virt -kernel needs no firmware).
		local qemu_root
		qemu_root=$("$RASVMM_ROOT/scripts/fetch-qemu.sh" aarch64)
		cp -a "$qemu_root/." "$2/"
		;;
	esac
}

# build_arch <arch>: the kernel, the static binaries and both initramfs of one
# architecture, and its manifest (printed).
build_arch() {
	local arch=$1 out target image bin busybox kernel_dir stage cc rasdaemon_root
	case "$arch" in
	x86_64)
		out=$images
		image=bzImage
		cc=gcc
		;;
	aarch64)
		out=$images/aarch64
		image=Image
		cc=aarch64-linux-gnu-gcc
		;;
	esac
	mkdir -p "$out"
	kernel_dir=$("$RASVMM_ROOT/scripts/build-kernel.sh" "$arch")
	target=$arch-unknown-linux-musl
	log "building static rasvmm and rasvmm-agent ($target)"
	# Two builds: `--bin lab-timer` in the same command would narrow it to that
	# binary alone and leave rasvmm and rasvmm-agent stale.
	(cd "$RASVMM_ROOT" && cargo build --quiet --release --target "$target" -p vmm -p guest-agent) ||
		die "cargo build --release --target $target -p vmm -p guest-agent failed"
	if [ -n "$bench" ]; then
		(cd "$RASVMM_ROOT" && cargo build --quiet --release --target "$target" -p lab --bin lab-timer) ||
			die "cargo build --release --target $target -p lab --bin lab-timer failed"
	fi
	bin="$RASVMM_ROOT/target/$target/release"
	busybox=$("$RASVMM_ROOT/scripts/fetch-busybox.sh" "$arch")

	stage="$out/stage"
	base_root "$stage/guest"
	install -m 0755 "$bin/rasvmm-agent" "$stage/guest/sbin/rasvmm-agent"
	install -m 0755 "$RASVMM_ROOT/images/guest-init" "$stage/guest/init"
	# The kernel itself, for the agent's kexec (kexec_file_load needs a file).
	mkdir -p "$stage/guest/boot"
	cp "$kernel_dir/$image" "$stage/guest/boot/$image"
	pack "$stage/guest" "$out/guest-initramfs.cpio"
	# The rasdaemon image: the same, plus Debian's rasdaemon and sqlite3
	# with their libraries, and the shim that spares rasdaemon its 30 s wait
	# for each trace event the guest kernel lacks (the file says why); the
	# guest's init starts rasdaemon when present.
	# (Assigned first: a failure inside "$(...)" as an argument would not
	# stop the script, and cp would copy "/.".)
	rasdaemon_root=$("$RASVMM_ROOT/scripts/fetch-rasdaemon.sh" "$arch")
	cp -a "$rasdaemon_root/." "$stage/guest/"
	mkdir -p "$stage/guest/usr/lib/rasvmm"
	"$cc" -shared -fPIC -O2 -Wall -Wextra -Werror \
		-o "$stage/guest/usr/lib/rasvmm/rasdaemon-skip-missing-events.so" \
		"$RASVMM_ROOT/images/rasdaemon-skip-missing-events.c" ||
		die "$cc could not build images/rasdaemon-skip-missing-events.c"
	pack "$stage/guest" "$out/guest-initramfs-rasdaemon.cpio"

	base_root "$stage/lab"
	mkdir -p "$stage/lab/guest"
	install -m 0755 "$bin/rasvmm" "$stage/lab/bin/rasvmm"
	cp "$kernel_dir/$image" "$stage/lab/guest/$image"
	# The same kernel as an ELF vmlinux, for the ELF boot path (symbols
	# stripped); x86_64 only: linux-loader boots an arm64 kernel as an Image.
	if [ "$arch" = x86_64 ]; then
		objcopy --strip-all "$kernel_dir/vmlinux" "$stage/lab/guest/vmlinux"
	fi
	cp "$out/guest-initramfs.cpio" "$stage/lab/guest/initramfs.cpio"
	cp "$out/guest-initramfs-rasdaemon.cpio" "$stage/lab/guest/initramfs-rasdaemon.cpio"
	install -m 0755 "$RASVMM_ROOT/images/lab-init" "$stage/lab/init"
	pack "$stage/lab" "$out/lab-initramfs.cpio.gz"

	if [ -n "$bench" ]; then
		install -m 0755 "$bin/lab-timer" "$stage/lab/bin/lab-timer"
		bench_qemu "$arch" "$stage/lab"
		pack "$stage/lab" "$out/lab-bench-initramfs.cpio.gz"
	fi
	rm -rf "$stage"

	cat >"$out/manifest" <<-MANIFEST
	kernel=$kernel_dir/$image
	vmlinux=$kernel_dir/vmlinux
	kernel_version=$(head -n1 "$kernel_dir/VERSION")
	guest_initramfs=$out/guest-initramfs.cpio
	guest_rasdaemon_initramfs=$out/guest-initramfs-rasdaemon.cpio
	lab_initramfs=$out/lab-initramfs.cpio.gz
	rasvmm=$bin/rasvmm
	$([ -n "$bench" ] && echo "lab_bench_initramfs=$out/lab-bench-initramfs.cpio.gz")
	MANIFEST
	# The distribution kernels of the kernel matrix (scenarios/matrix/).
	"$RASVMM_ROOT/scripts/fetch-distro-kernels.sh" "$arch" >&2
	log "$arch images in $out ($(du -h "$out/lab-initramfs.cpio.gz" | cut -f1) lab initramfs)"
	echo "$out/manifest"
}

for arch in "${arches[@]}"; do
	build_arch "$arch"
done
