#!/usr/bin/env bash
# Builds the rasvmm Linux 7.3 kernel for an architecture (x86_64, aarch64)
# from Debian's linux-source-7.3, tinyconfig + guest-kernel-patches/<arch>/rasvmm.config,
# with guest-kernel-patches/series applied. Prints the output directory: the
# boot image (x86_64: bzImage; aarch64: Image, cross-built with
# aarch64-linux-gnu-gcc), vmlinux, config, VERSION.
#
# Builds are cached in $RASVMM_CACHE/kernels/<arch>-<key>, the key hashing the
# source version, every patch in the series, the fragment and this script, so
# a warm run costs nothing and any change rebuilds.
source "$(dirname "$0")/lib.sh"

arch=${1:-x86_64}
case "$arch" in
x86_64)
	karch=x86
	image=bzImage
	cross=()
	;;
aarch64)
	karch=arm64
	image=Image
	cross=(CROSS_COMPILE=aarch64-linux-gnu-)
	;;
*) die "unsupported kernel arch '$arch' (supported: x86_64, aarch64)" ;;
esac
patches="$RASVMM_ROOT/guest-kernel-patches"
fragment="$patches/$arch/rasvmm.config"
series="$patches/series/series"

tarball=$("$RASVMM_ROOT/scripts/fetch-kernel.sh")
version=$(basename "$tarball" .tar.xz)
version=${version#linux-source-7.3_}

mapfile -t series_files < <(grep -vE '^[[:space:]]*(#|$)' "$series" || true)
key=$({
	echo "$version"
	cat "$fragment" "$0" "$series"
	for p in "${series_files[@]}"; do cat "$patches/series/$p"; done
} | sha256sum | cut -c1-16)
out="$RASVMM_CACHE/kernels/$arch-$key"
if [ -e "$out/$image" ]; then
	echo "$out"
	exit 0
fi

exec 9>"$RASVMM_CACHE/kernel-build.lock"
flock 9
[ -e "$out/$image" ] && { echo "$out"; exit 0; }

if [ ${#cross[@]} -gt 0 ]; then
	command -v "${cross[0]#CROSS_COMPILE=}gcc" >/dev/null ||
		die "${cross[0]#CROSS_COMPILE=}gcc is missing: run scripts/install-deps.sh"
fi
build="$RASVMM_CACHE/build/$arch-$key"
rm -rf "$build"
mkdir -p "$build"
log "kernel $version ($arch, key $key): extracting source"
tar -xJf "$tarball" -C "$build"
src="$build/linux-source-7.3"
for p in "${series_files[@]}"; do
	log "applying $p"
	patch -d "$src" -p1 --quiet --forward <"$patches/series/$p" || die "patch $p does not apply to $version"
done

log "configuring (tinyconfig + $(basename "$fragment"))"
kmake=(make -C "$src" -s ARCH="$karch" "${cross[@]}")
"${kmake[@]}" tinyconfig >/dev/null
(cd "$src" && ARCH="$karch" ./scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null)
"${kmake[@]}" olddefconfig >/dev/null
missing=""
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=*) grep -qxF "$line" "$src/.config" || missing="$missing ${line%%=*}" ;;
	"# CONFIG_"*" is not set")
		opt=${line#\# }
		opt=${opt%% *}
		grep -q "^$opt=" "$src/.config" && missing="$missing $opt(should be off)"
		;;
	esac
done <"$fragment"
[ -z "$missing" ] || die "kernel config did not take:$missing (check dependencies in $fragment)"

log "building $image with $(nproc) jobs (about 5-7 minutes on 2 cores)"
start=$(date +%s)
"${kmake[@]}" -j"$(nproc)" "$image" >"$build/build.log" 2>&1 ||
	{ tail -n 30 "$build/build.log" >&2; die "kernel build failed; log: $build/build.log"; }
log "built in $(($(date +%s) - start)) s"

tmp="$out.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
cp "$src/arch/$karch/boot/$image" "$src/vmlinux" "$src/System.map" "$tmp/"
cp "$src/.config" "$tmp/config"
printf 'linux-source-7.3 %s\nkernelrelease %s\nkey %s\npatches %s\n' "$version" \
	"$("${kmake[@]}" kernelrelease)" "$key" "${series_files[*]:-none}" >"$tmp/VERSION"
mv "$tmp" "$out"
rm -rf "$build"
echo "$out"
