#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, the KVM plumbing tests
# (tiny payloads on this machine's /dev/kvm), the CLI tests, and the
# integration tests that boot real Linux 7.3 guests (directly on hardware
# KVM, else in the lab host), then a bounded fuzz run of the parsers that
# read untrusted input. Installs and builds whatever is missing first.
source "$(dirname "$0")/lib.sh"
"$RASVMM_ROOT/scripts/install-deps.sh"
"$RASVMM_ROOT/scripts/build-images.sh" >/dev/null
cd "$RASVMM_ROOT"
log "cargo fmt --check"
cargo fmt --all -- --check || die "code is not formatted: run cargo fmt --all"
log "cargo clippy"
cargo clippy --quiet --workspace --all-targets -- -D warnings
log "cargo test (unit, KVM plumbing, CLI, integration)"
cargo test --workspace --all-targets
log "fuzzing the untrusted-input parsers (bounded)"
"$RASVMM_ROOT/scripts/fuzz.sh"
log "all tests passed"
