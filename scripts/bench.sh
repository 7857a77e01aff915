#!/usr/bin/env bash
# Benchmarks: rasvmm against QEMU in one lab-host run each, printed as
# ratios (boot to agent ready; machine-check injection to the guest's panic,
# and a page going bad under a process to its SIGBUS, which QEMU cannot reach),
# GHES-NMI against MCE SRAO for the same page (both rasvmm, one run), and
# the KHO observer's scan speed against one read per page (this host).
# Record the figures in docs/benchmarks.md. Arguments: [--runs N].
source "$(dirname "$0")/lib.sh"
"$RASVMM_ROOT/scripts/install-deps.sh"
"$RASVMM_ROOT/scripts/build-images.sh" --bench x86_64 >/dev/null
cd "$RASVMM_ROOT"
cargo build --quiet --release -p lab
RASVMM_BACKEND=lab "$RASVMM_ROOT/target/release/rasvmm-lab" bench-boot "$@"
RASVMM_BACKEND=lab "$RASVMM_ROOT/target/release/rasvmm-lab" bench-inject "$@"
RASVMM_BACKEND=lab "$RASVMM_ROOT/target/release/rasvmm-lab" bench-ghes "$@"
RASVMM_BACKEND=lab "$RASVMM_ROOT/target/release/rasvmm-lab" bench-kho
