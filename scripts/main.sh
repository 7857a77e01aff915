#!/usr/bin/env bash
# The main job: set up whatever is missing (Debian packages, the Linux 7.3
# kernel build, the initramfs images), then run the built-in x86_64 scenario
# suite (scenarios/x86_64) and print its verdict table; JUnit XML and JSON go
# to target/scenario-results/. On a host without hardware KVM the guests run
# inside the emulated lab host. Extra arguments go to `rasvmm-lab suite`
# (a scenario directory, --junit FILE, --json FILE).
source "$(dirname "$0")/lib.sh"
"$RASVMM_ROOT/scripts/install-deps.sh"
# The suite is x86_64's: only its images (test.sh builds both architectures').
"$RASVMM_ROOT/scripts/build-images.sh" x86_64 >/dev/null
cd "$RASVMM_ROOT"
cargo build --quiet --release -p lab
exec "$RASVMM_ROOT/target/release/rasvmm-lab" suite "$@"
