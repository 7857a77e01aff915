//! The built-in aarch64 scenario suite (scenarios/aarch64/*.toml, some of
//! them x86's files where the meaning is the same), run for real in the
//! aarch64 lab host (or directly on an arm64 host with KVM): synchronous
//! external aborts, GHES records, sticky poison, KHO, and what Linux 7.3
//! on arm64 does about them. Fails with each failing scenario's reasons.

use lab::{scenarios, Arch, Lab};

#[test]
fn every_built_in_aarch64_scenario_passes() {
    let all = scenarios::load_dir(&scenarios::default_dir_for(Arch::Aarch64))
        .expect("the aarch64 suite loads");
    let lab = Lab::for_arch(Arch::Aarch64)
        .unwrap_or_else(|e| panic!("{e} ({:?})", std::error::Error::source(&e)));
    lab::progress(&format!(
        "{} aarch64 scenarios on {}",
        all.len(),
        lab.backend
    ));
    let (results, _) = scenarios::run(&lab, &all)
        .unwrap_or_else(|e| panic!("{e} ({:?})", std::error::Error::source(&e)));
    let table = scenarios::table(&results);
    lab::progress(&table);
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.name.as_str())
        .collect();
    assert!(failed.is_empty(), "failed: {failed:?}\n{table}");
    assert_eq!(results.len(), all.len());
}
