#!/usr/bin/env bash
# Benchmarks: rasvmm against QEMU in one lab-host run, printed as ratios.
# Record the figures in docs/benchmarks.md.
source "$(dirname "$0")/lib.sh"
"$RASVMM_ROOT/scripts/install-deps.sh"
"$RASVMM_ROOT/scripts/build-images.sh" --bench >/dev/null
cd "$RASVMM_ROOT"
cargo build --quiet --release -p lab
RASVMM_BACKEND=lab exec "$RASVMM_ROOT/target/release/rasvmm-lab" bench-boot "$@"
