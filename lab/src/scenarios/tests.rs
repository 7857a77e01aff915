//! The suite's unit tests.

use super::*;
use vmm::report::RunReport;
#[test]
fn the_built_in_suite_parses() {
    let all = load_dir(&default_dir()).unwrap();
    assert!(all.len() >= 10, "{}", all.len());
    let names: std::collections::BTreeSet<&str> =
        all.iter().map(|(_, s)| s.name.as_str()).collect();
    assert_eq!(names.len(), all.len(), "scenario names are unique");
    // The 2-vCPU scenarios, kept out of the suite for the lab host's
    // sake (docs/lab-host.md), stay valid.
    let multi = default_dir().join("../x86_64-multi-vcpu");
    assert_eq!(load_dir(&multi).unwrap().len(), 3);
    // So does the one whose outcome depends on physical placement
    // (scenarios/x86_64-nondeterministic/README.md).
    let placement = default_dir().join("../x86_64-nondeterministic");
    assert_eq!(load_dir(&placement).unwrap().len(), 1);
    // The aarch64 suite: its own files and x86's where the meaning is
    // the same (symlinks).
    let arm = load_dir(&default_dir_for(crate::Arch::Aarch64)).unwrap();
    assert!(arm.len() >= 10, "{}", arm.len());
    let names: std::collections::BTreeSet<&str> =
        arm.iter().map(|(_, s)| s.name.as_str()).collect();
    assert_eq!(names.len(), arm.len(), "aarch64 scenario names are unique");
    for (_, s) in &arm {
        assert!(s.guest.cpu.is_none(), "{}: arm64 has one CPU model", s.name);
    }
}

/// The project kernel's images, as kernels::images gives them.
fn project_images() -> KernelImages {
    KernelImages {
        args: Vec::new(),
        rasdaemon_args: vec!["--initramfs".into(), "@rasdaemon-initramfs".into()],
        files: Vec::new(),
    }
}

#[test]
fn a_lab_host_that_stops_loses_nothing_and_the_rest_run_again() {
    let images = project_images();
    let on = On {
        kernel: "k",
        images: &images,
    };
    let all: Vec<(PathBuf, Scenario)> = (0..5)
        .map(|i| {
            let text = format!("name = \"s{i}\"\nsteps = []\n[expect]\noutcome = \"poweroff\"");
            (
                PathBuf::from(format!("s{i}.toml")),
                Scenario::parse(&text).unwrap(),
            )
        })
        .collect();
    let passed = |name: &str| RunResult {
        exit: 0,
        report: Some({
            let o = vmm::outcome::Outcome {
                kind: vmm::outcome::OutcomeKind::Poweroff,
                detail: String::new(),
                log: vec![],
            };
            let mut r = RunReport::new(o, "amd", 1, 256);
            r.scenario = Some(name.into());
            r.verdict = Some(vmm::report::Verdict {
                passed: true,
                failures: vec![],
                not_applicable: vec![],
            });
            serde_json::to_value(r).unwrap()
        }),
        console: String::new(),
        stderr: String::new(),
    };
    let check = |sleep_ms: u64| {
        let o = vmm::outcome::Outcome {
            kind: vmm::outcome::OutcomeKind::Poweroff,
            detail: String::new(),
            log: vec![],
        };
        let mut r = RunReport::new(o, "intel", 1, 256);
        for (i, at_ms) in [(0, 3000), (1, 3000 + sleep_ms)] {
            r.steps.push(vmm::report::StepRecord {
                step: CLOCK_CHECK[3 + 2 * i].into(),
                reply: None,
                error: None,
                cut_short: false,
                at_ms,
            });
        }
        RunResult {
            exit: 0,
            report: Some(serde_json::to_value(r).unwrap()),
            console: String::new(),
            stderr: String::new(),
        }
    };
    let check_ok = check(1180);
    let lab = |runs: Vec<RunResult>, incomplete: Option<&str>| JobResult {
        backend: crate::Backend::Lab,
        runs: std::iter::once(check_ok.clone()).chain(runs).collect(),
        wall: Duration::from_secs(1),
        files: Default::default(),
        incomplete: incomplete.map(String::from),
    };
    // The first lab host finishes s0 and dies in s1; a fresh one runs
    // s1 again, then the rest. s1 passes, marked as retried.
    let mut calls = Vec::new();
    let (results, wall) = run_with(
        &all,
        &on,
        |job, _| {
            calls.push(job.runs.len());
            Ok(match calls.len() {
                1 => lab(vec![passed("s0")], Some("died")),
                _ => lab(
                    vec![passed("s1"), passed("s2"), passed("s3"), passed("s4")],
                    None,
                ),
            })
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(calls, vec![6, 5], "each job starts with the clock check");
    assert_eq!(wall, 2.0);
    let summary: Vec<(&str, bool)> = results
        .iter()
        .map(|r| (r.name.as_str(), r.passed))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("s0", true),
            ("s1", true),
            ("s2", true),
            ("s3", true),
            ("s4", true)
        ]
    );
    let retried: Vec<bool> = results.iter().map(|r| r.retried.is_some()).collect();
    assert_eq!(retried, vec![false, true, false, false, false]);
    assert!(results[1].retried.as_deref().unwrap().contains("died"));
    assert!(table(&results).contains("~ retried once: the lab host stopped"));
    assert!(junit(&results, 2.0, crate::Arch::X86_64)
        .contains("<flakyFailure message=\"the lab host stopped"));

    // Dying twice in the same scenario fails it, with both reasons; the
    // rest still run.
    let mut calls = Vec::new();
    let (results, _) = run_with(
        &all,
        &on,
        |job, _| {
            calls.push(job.runs.len());
            Ok(match calls.len() {
                1 => lab(vec![passed("s0")], Some("died once")),
                2 => lab(vec![], Some("died twice")),
                _ => lab(vec![passed("s2"), passed("s3"), passed("s4")], None),
            })
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(calls, vec![6, 5, 4]);
    assert!(!results[1].passed);
    assert_eq!(results[1].outcome, "lab-host-stopped");
    assert!(
        results[1].failures[0].contains("died once")
            && results[1].failures[0].contains("on its retry")
            && results[1].failures[0].contains("died twice"),
        "{:?}",
        results[1].failures
    );
    assert!(results[2..].iter().all(|r| r.passed));

    // A lab host that keeps dying is given up on, every scenario named.
    let mut calls = Vec::new();
    let (results, _) = run_with(
        &all,
        &on,
        |job, _| {
            calls.push(job.runs.len());
            Ok(lab(Vec::new(), Some("died")))
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(calls, vec![6, 6, 5, 5]);
    assert_eq!(results.len(), 5);
    assert!(results.iter().all(|r| !r.passed));
    assert!(results[0].failures[0].contains("on its retry"));
    assert!(results[1].failures[0].contains("on its retry"));
    assert!(results[2..]
        .iter()
        .all(|r| r.failures[0].starts_with("not run: the lab host stopped 4 times")));

    // Given up on while a retry was due: that scenario says so.
    let mut calls = 0;
    let (results, _) = run_with(
        &all,
        &on,
        |_, _| {
            calls += 1;
            Ok(match calls {
                1 => lab(vec![passed("s0")], Some("a")),
                2 => lab(vec![passed("s1")], Some("b")),
                3 => lab(vec![passed("s2")], Some("c")),
                _ => lab(vec![passed("s3")], Some("d")),
            })
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(calls, 4);
    assert!(
        results.last().unwrap().failures[0].contains("(no retry)"),
        "{results:?}"
    );
}

#[test]
fn bad_directories_are_one_line_errors() {
    let e = load_dir(Path::new("/nonexistent")).unwrap_err();
    assert!(
        e.starts_with("cannot read scenario directory '/nonexistent'"),
        "{e}"
    );
}

#[test]
fn a_rasdaemon_scenario_runs_on_the_rasdaemon_image() {
    let images = project_images();
    let on = On {
        kernel: "k",
        images: &images,
    };
    let parse = |t: &str| Scenario::parse(t).unwrap();
    let plain = parse("name = \"a\"\nsteps = []\n[expect]\noutcome = \"poweroff\"");
    let ras = parse(
        "name = \"b\"\nsteps = []\n[guest]\nimage = \"rasdaemon\"\n[expect]\noutcome = \"poweroff\"",
    );
    let j = job(
        &[
            (PathBuf::from("a.toml"), plain),
            (PathBuf::from("b.toml"), ras),
        ],
        &on,
    );
    assert_eq!(j.runs[1], vec!["--scenario", "@job/a.toml"]);
    assert_eq!(
        j.runs[2],
        vec![
            "--initramfs",
            "@rasdaemon-initramfs",
            "--scenario",
            "@job/b.toml"
        ]
    );
    assert!(Scenario::parse(
        "name = \"c\"\nsteps = []\n[guest]\nimage = \"fedora\"\n[expect]\noutcome = \"poweroff\""
    )
    .is_err());
}

#[test]
fn every_run_of_a_suite_job_has_its_own_limit() {
    let images = project_images();
    let on = On {
        kernel: "k",
        images: &images,
    };
    let parse = |t: &str| Scenario::parse(t).unwrap();
    let quick = parse(
        "name = \"a\"\nsteps = []\n[guest]\ntimeout_s = 20\n[expect]\noutcome = \"poweroff\"",
    );
    let plain = parse("name = \"b\"\nsteps = []\n[expect]\noutcome = \"poweroff\"");
    let j = job(
        &[
            (PathBuf::from("a.toml"), quick),
            (PathBuf::from("b.toml"), plain),
        ],
        &on,
    );
    assert_eq!(CLOCK_CHECK[1].parse::<f64>(), Ok(CLOCK_CHECK_TIMEOUT_S));
    let secs: Vec<f64> = j.run_limits.iter().map(|d| d.as_secs_f64()).collect();
    assert_eq!(
        secs,
        vec![
            CLOCK_CHECK_TIMEOUT_S + PER_SCENARIO_MARGIN,
            20.0 + PER_SCENARIO_MARGIN,
            vmm::config::DEFAULT_TIMEOUT_S + PER_SCENARIO_MARGIN
        ]
    );
    // The job's own budget still holds them all, and the lab host's boot.
    assert!(j.timeout.as_secs_f64() >= secs.iter().sum::<f64>() + 60.0);
}
