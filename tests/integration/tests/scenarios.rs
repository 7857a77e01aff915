//! The built-in x86_64 scenario suite (scenarios/x86_64/*.toml), run for
//! real: machine checks, sticky poison, and what Linux 7.3 does about them.
//! Every scenario runs as its own rasvmm run in one lab-host boot and is
//! judged by rasvmm against the expectation in its file; this test fails
//! with each failing scenario's reasons.

use lab::{scenarios, Arch};

#[test]
fn every_built_in_scenario_passes() {
    let (failed, table) = scenarios::run_built_in(Arch::X86_64).unwrap_or_else(|e| panic!("{e}"));
    assert!(failed.is_empty(), "failed: {failed:?}\n{table}");
}
