//! The built-in x86_64 scenario suite (scenarios/x86_64/*.toml), run for
//! real: machine checks, sticky poison, and what Linux 7.3 does about them.
//! Every scenario runs as its own rasvmm run in one lab-host boot and is
//! judged by rasvmm against the expectation in its file; this test fails
//! with each failing scenario's reasons.

use lab::{scenarios, Lab};

#[test]
fn every_built_in_scenario_passes() {
    let all = scenarios::load_dir(&scenarios::default_dir()).expect("the suite loads");
    let lab = Lab::new().unwrap_or_else(|e| panic!("{e} ({:?})", std::error::Error::source(&e)));
    lab::progress(&format!("{} scenarios on {}", all.len(), lab.backend));
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
