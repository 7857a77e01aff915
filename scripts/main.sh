#!/usr/bin/env bash
# The main job: set up whatever is missing (Debian packages, the Linux 7.3
# kernels, Debian's distribution kernels, the initramfs images of both
# architectures), then run the built-in scenario suites, x86_64
# (scenarios/x86_64) and aarch64 (scenarios/aarch64), on each kernel of
# that architecture's matrix (scenarios/matrix/<arch>.toml: the project's
# patched 7.3 build, Debian's 7.3 and 6.12 LTS cloud kernels). It prints a
# line per scenario as it finishes, each kernel's verdict table and the
# matrix; JUnit XML and JSON go to target/scenario-results/<arch>/. On a
# host without hardware KVM the guests run inside the emulated lab host of
# their architecture. The exit status is non-zero if any scenario of either
# suite failed (an n/a, a scenario the kernel cannot run, is not a failure).
#
# With arguments, runs one suite: they go to `rasvmm-lab suite`
# ([--arch ARCH] [DIR] [--junit FILE] [--json FILE]).
source "$(dirname "$0")/lib.sh"
"$RASVMM_ROOT/scripts/install-deps.sh"
"$RASVMM_ROOT/scripts/build-images.sh" >/dev/null
cd "$RASVMM_ROOT"
cargo build --quiet --release -p lab
lab="$RASVMM_ROOT/target/release/rasvmm-lab"
[ $# -eq 0 ] || exec "$lab" suite "$@"
status=0
for arch in x86_64 aarch64; do
	echo "=== $arch suite"
	"$lab" suite --arch "$arch" --matrix || status=1
	echo
done
exit $status
