//! The kernel matrix: which (kernel, scenario) pairs a suite runs, in
//! which shard, and whether each kernel offered what its entry in the
//! kernels file says (see docs/kernel-matrix.md).

use std::path::PathBuf;

use guest_agent::KernelFeature;
use serde::{Deserialize, Serialize};
use vmm::scenario::Scenario;

use crate::kernels::GuestKernel;
use crate::scenarios::ScenarioResult;

/// The built-in matrix of `arch`: scenarios/matrix/<arch>.toml.
pub fn default_file(arch: crate::Arch) -> PathBuf {
    crate::scenarios::default_dir_for(arch)
        .join("../matrix")
        .join(format!("{}.toml", arch.name()))
}

/// `--shard K/N`: the K-th of N parts (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// Which part, from 1.
    pub k: usize,
    /// Of how many.
    pub n: usize,
}

impl Shard {
    /// `K/N`; the error is one line.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let bad = || format!("--shard needs K/N with 1 <= K <= N <= 1000, got '{s}'");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n) = (k.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
        if k == 0 || k > n || n > 1000 {
            return Err(bad());
        }
        Ok(Shard { k, n })
    }

    /// Whether the `i`-th (kernel, scenario) pair is this shard's: every
    /// N-th pair, so that each shard gets a share of every kernel.
    pub fn takes(self, i: usize) -> bool {
        i % self.n == self.k - 1
    }
}

/// Each kernel with the scenarios it runs (in this shard).
pub type Plan<'a> = Vec<(&'a GuestKernel, Vec<(PathBuf, Scenario)>)>;

/// The plan of a matrix: each kernel (in order) with the scenarios of the
/// suite `all` it runs (its `scenarios`, or all), in this shard.
pub fn plan<'a>(
    kernels: &'a [GuestKernel],
    all: &[(PathBuf, Scenario)],
    shard: Option<Shard>,
) -> Result<Plan<'a>, String> {
    let mut i = 0;
    let mut out = Vec::new();
    for k in kernels {
        if let Some(names) = &k.scenarios {
            if let Some(n) = names
                .iter()
                .find(|n| !all.iter().any(|(_, s)| &s.name == *n))
            {
                return Err(format!(
                    "kernel '{}' names scenario '{n}', which is not in the suite",
                    k.name
                ));
            }
        }
        let mut mine = Vec::new();
        for (f, s) in all {
            if k.scenarios.as_ref().is_some_and(|n| !n.contains(&s.name)) {
                continue;
            }
            if shard.is_none_or(|sh| sh.takes(i)) {
                mine.push((f.clone(), s.clone()));
            }
            i += 1;
        }
        out.push((k, mine));
    }
    Ok(out)
}

/// The features a scenario's guest cannot show, whatever its kernel has:
/// KHO's without `kho=on` on its command line, GHES with device-tree
/// tables (no ACPI, so no GHES driver).
fn hidden_by_boot(s: &Scenario) -> Vec<KernelFeature> {
    let mut hidden = Vec::new();
    let append = s.guest.append.as_deref().unwrap_or("");
    if !append.split_whitespace().any(|w| w == "kho=on") {
        hidden.extend([KernelFeature::Kho, KernelFeature::KhoHwpoison]);
    }
    if s.guest.tables.as_deref() == Some("dt") {
        hidden.extend([KernelFeature::Ghes, KernelFeature::Einj]);
    }
    hidden
}

/// The name of the row [`features_check`] adds to a kernel's results.
pub const FEATURES_ROW: &str = "kernel-features";

/// For a kernel whose entry says what it `lacks`: a failed result if any
/// run's guest reported other features than all but those (the entry is
/// stale, or the kernel is not the one the lab meant); none otherwise.
/// Some features depend on how a scenario (of `scenarios`) boots the
/// guest, not only on the kernel: KHO is on only with `kho=on`, and GHES
/// and EINJ need ACPI tables; a run that boots without them says nothing of those
/// features.
pub fn features_check(
    k: &GuestKernel,
    results: &[ScenarioResult],
    scenarios: &[(PathBuf, Scenario)],
) -> Option<ScenarioResult> {
    let lacks = k.lacks.as_ref()?;
    let want: Vec<KernelFeature> = KernelFeature::ALL
        .into_iter()
        .filter(|f| !lacks.contains(f))
        .collect();
    let mut failures = Vec::new();
    for r in results {
        // A run whose agent never came up says nothing.
        let Some(got) = &r.features else { continue };
        let hidden = scenarios
            .iter()
            .find(|(_, s)| s.name == r.name)
            .map_or_else(Vec::new, |(_, s)| hidden_by_boot(s));
        let differ: Vec<&str> = KernelFeature::ALL
            .iter()
            .filter(|f| want.contains(f) != got.contains(f))
            .filter(|f| !hidden.contains(f))
            .map(|f| f.name())
            .collect();
        if !differ.is_empty() {
            failures.push(format!(
                "{}: the guest reported {:?}; the kernels file says it lacks exactly {:?} (differs in: {})",
                r.name,
                got.iter().map(|f| f.name()).collect::<Vec<_>>(),
                lacks.iter().map(|f| f.name()).collect::<Vec<_>>(),
                differ.join(", ")
            ));
        }
    }
    if results.iter().all(|r| r.features.is_none()) {
        failures.push("no run's agent reported the kernel's features".into());
    }
    Some(ScenarioResult {
        name: FEATURES_ROW.into(),
        kernel: k.name.clone(),
        cpu: "-".into(),
        outcome: "-".into(),
        passed: failures.is_empty(),
        failures,
        not_applicable: Vec::new(),
        features: None,
        retried: None,
        diagnosis: Vec::new(),
        views: Vec::new(),
        seconds: 0.0,
        report: serde_json::Value::Null,
    })
}

/// Runs `arch`'s built-in matrix (scenarios/matrix/<arch>.toml) on its
/// kernels other than the project's own build (whose whole suite is
/// [`crate::scenarios::run_built_in`]), printing a progress line per
/// scenario; the failed (kernel, scenario) pairs (empty if none failed)
/// and the matrix. An error if the matrix cannot load or the lab cannot
/// run: a missing distribution kernel names the script that fetches it.
pub fn run_built_in_others(arch: crate::Arch) -> Result<(Vec<String>, String), String> {
    let all = crate::scenarios::load_dir(&crate::scenarios::default_dir_for(arch))?;
    let kernels: Vec<GuestKernel> = crate::kernels::load_file(&default_file(arch))?
        .into_iter()
        .filter(|k| k.path.is_some())
        .collect();
    if kernels.is_empty() {
        return Err(format!(
            "the {} matrix names no kernel but the project's",
            arch.name()
        ));
    }
    let plan = plan(&kernels, &all, None)?;
    let total: usize = plan.iter().map(|(_, s)| s.len()).sum();
    let lab = crate::Lab::for_arch(arch).map_err(|e| vmm::report::one_line(&e))?;
    let mut results = Vec::new();
    let mut done = 0;
    for (k, mine) in &plan {
        let mut on_result = |r: &ScenarioResult| {
            done += 1;
            crate::progress(&crate::scenarios::progress_line(r, done, total));
        };
        let (mut rs, _) = crate::scenarios::run_on(&lab, mine, k, &mut on_result)
            .map_err(|e| vmm::report::one_line(&e))?;
        rs.extend(features_check(k, &rs, mine));
        results.extend(rs);
    }
    let names: Vec<String> = kernels.iter().map(|k| k.name.clone()).collect();
    let mut table = String::new();
    for k in &names {
        let mine: Vec<ScenarioResult> =
            results.iter().filter(|r| &r.kernel == k).cloned().collect();
        table += &format!("== {k}\n{}", crate::scenarios::table(&mine));
    }
    table += &crate::scenarios::matrix(&results, &names);
    crate::progress(&table);
    let failed = results
        .iter()
        .filter(|r| r.status() == crate::scenarios::Status::Failed)
        .map(|r| format!("{}: {}", r.kernel, r.name))
        .collect();
    Ok((failed, table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use KernelFeature::*;

    fn run(name: &str, features: Option<Vec<KernelFeature>>) -> ScenarioResult {
        ScenarioResult {
            name: name.into(),
            kernel: "k".into(),
            cpu: "amd".into(),
            outcome: "poweroff".into(),
            passed: true,
            failures: Vec::new(),
            not_applicable: Vec::new(),
            features,
            retried: None,
            diagnosis: Vec::new(),
            views: Vec::new(),
            seconds: 1.0,
            report: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_kernel_must_offer_what_its_entry_says() {
        let mut k = GuestKernel::project();
        assert!(features_check(&k, &[], &[]).is_none(), "no lacks: no check");
        k.lacks = Some(vec![PanicSysctl, Kho, KhoHwpoison, HwpoisonInject, Einj]);
        let old = vec![MemoryFailure, MachineCheck, Ghes, KexecFile];
        let mut all = old.clone();
        all.extend([PanicSysctl, Kho, KhoHwpoison, HwpoisonInject, Einj]);
        let mut kho_on: Vec<(PathBuf, Scenario)> = ["a", "b"]
            .iter()
            .map(|n| {
                let text = format!("name = \"{n}\"\nsteps = []\n[guest]\nappend = \"kho=on\"\n[expect]\noutcome = \"poweroff\"");
                (PathBuf::from(n), Scenario::parse(&text).unwrap())
            })
            .collect();
        let ok =
            features_check(&k, &[run("a", Some(old.clone())), run("b", None)], &kho_on).unwrap();
        assert!(ok.passed, "{:?}", ok.failures);
        let bad = features_check(&k, &[run("a", Some(all.clone()))], &kho_on).unwrap();
        assert!(!bad.passed);
        assert!(
            bad.failures[0]
                .contains("differs in: panic-sysctl, kho, kho-hwpoison, hwpoison-inject, einj"),
            "{:?}",
            bad.failures
        );
        // A run not booted with kho=on reports neither KHO feature: not a
        // difference for a kernel that has them; one booted with it is.
        k.lacks = Some(vec![]);
        let kho_off: Vec<KernelFeature> = all
            .iter()
            .copied()
            .filter(|f| !matches!(f, Kho | KhoHwpoison))
            .collect();
        // "c" boots without kho=on, "d" with device-tree tables.
        for (n, guest) in [("c", ""), ("d", "[guest]\ntables = \"dt\"\n")] {
            let text =
                format!("name = \"{n}\"\nsteps = []\n{guest}[expect]\noutcome = \"poweroff\"");
            kho_on.push((PathBuf::from(n), Scenario::parse(&text).unwrap()));
        }
        let no_ghes: Vec<KernelFeature> = kho_off.iter().copied().filter(|f| *f != Ghes).collect();
        assert!(
            features_check(&k, &[run("d", Some(no_ghes.clone()))], &kho_on)
                .unwrap()
                .passed
        );
        assert!(
            !features_check(&k, &[run("c", Some(no_ghes))], &kho_on)
                .unwrap()
                .passed
        );
        let c = [run("c", Some(kho_off.clone()))];
        assert!(features_check(&k, &c, &kho_on).unwrap().passed);
        let a = [run("a", Some(kho_off))];
        assert!(!features_check(&k, &a, &kho_on).unwrap().passed);
        let none = features_check(&k, &[run("a", None)], &kho_on).unwrap();
        assert_eq!(
            none.failures,
            vec!["no run's agent reported the kernel's features"]
        );
    }
}
