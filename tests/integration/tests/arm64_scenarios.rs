//! The built-in aarch64 scenario suite (scenarios/aarch64/*.toml, some of
//! them x86's files where the meaning is the same), run for real in the
//! aarch64 lab host (or directly on an arm64 host with KVM): synchronous
//! external aborts, GHES records, sticky poison, KHO, and what Linux 7.3
//! on arm64 does about them. Fails with each failing scenario's reasons.

use lab::{scenarios, Arch};

#[test]
fn every_built_in_aarch64_scenario_passes() {
    let (failed, table) = scenarios::run_built_in(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    assert!(failed.is_empty(), "failed: {failed:?}\n{table}");
}
