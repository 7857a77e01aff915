#!/usr/bin/env bash
# The main job: set up whatever is missing (Debian packages, the Linux 7.3
# kernel build, the initramfs images), then boot the default guest under
# rasvmm and print its outcome and boot time. On a host without hardware KVM
# the guest runs inside the emulated lab host.
source "$(dirname "$0")/lib.sh"
"$RASVMM_ROOT/scripts/install-deps.sh"
"$RASVMM_ROOT/scripts/build-images.sh" >/dev/null
cd "$RASVMM_ROOT"
cargo build --quiet --release -p lab
exec "$RASVMM_ROOT/target/release/rasvmm-lab" demo
