#!/usr/bin/env bash
# Runs every test, for both architectures: formatting and lints (the
# aarch64-only code linted for its own target too), unit tests, the KVM
# plumbing tests (tiny payloads on this machine's /dev/kvm), the CLI tests,
# and the integration tests that boot real Linux guests, x86_64 and aarch64
# (directly on hardware KVM of the guest's architecture, else in that
# architecture's lab host): the built-in suites on the project's 7.3 build,
# and the kernel matrix's subsets on Debian's 7.3 and 6.12 cloud kernels;
# then a bounded fuzz run of the parsers that read untrusted input. Installs and builds whatever is missing first.
source "$(dirname "$0")/lib.sh"
"$RASVMM_ROOT/scripts/install-deps.sh"
"$RASVMM_ROOT/scripts/build-images.sh" >/dev/null
cd "$RASVMM_ROOT"
log "cargo fmt --check"
cargo fmt --all -- --check || die "code is not formatted: run cargo fmt --all"
log "cargo clippy"
cargo clippy --quiet --workspace --all-targets -- -D warnings
log "cargo clippy (aarch64 target: the arm64 machine, SEA and GIC code)"
cargo clippy --quiet --target aarch64-unknown-linux-musl -p vmm -p arch -p devices -p ras \
	-p guest-agent -- -D warnings
log "cargo test (unit, KVM plumbing, CLI, integration)"
# --no-fail-fast: one failing test binary must not hide the others' results.
cargo test --workspace --all-targets --no-fail-fast
log "fuzzing the untrusted-input parsers (bounded)"
"$RASVMM_ROOT/scripts/fuzz.sh"
log "all tests passed"
