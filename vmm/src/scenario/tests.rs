//! The scenario parser's unit tests.

use guest_agent::Command;

use super::*;

#[test]
fn parses() {
    let s = Scenario::parse(
        r#"
name = "sticky-user-page"
steps = ["alloc-page", "poison:page0", "touch-page:0", "page-info:page0", "poweroff"]
[guest]
cpu = "amd"
[expect]
outcome = "poweroff"
signals = [{ code = "BUS_MCEERR_AR", page = "page0" }]
[expect.kho]
state = "valid"
verdict = "agree"
"#,
    )
    .unwrap();
    assert_eq!(s.guest.cpu.as_deref(), Some("amd"));
    let k = s.expect.kho.unwrap();
    assert_eq!(
        (k.state, k.verdict),
        (Some(KhoState::Valid), Some(KhoVerdict::Agree))
    );
}

#[test]
fn expectation_follows_ser() {
    let text = r#"
name = "x"
steps = []
[expect]
outcome = "poweroff"
[expect_without_ser]
outcome = "panic"
"#;
    let s = Scenario::parse(text).unwrap();
    assert_eq!(s.expectation(true, None).outcome, OutcomeKind::Poweroff);
    assert_eq!(s.expectation(false, None).outcome, OutcomeKind::Panic);
}

#[test]
fn expectation_follows_the_kernel() {
    let text = r#"
name = "x"
steps = []
requires = ["memory-failure"]
[expect]
outcome = "panic"
[expect_without.panic-sysctl]
outcome = "timeout"
"#;
    let s = Scenario::parse(text).unwrap();
    use KernelFeature::*;
    let new = [MemoryFailure, PanicSysctl];
    let old = [MemoryFailure];
    assert_eq!(s.expectation(true, Some(&new)).outcome, OutcomeKind::Panic);
    assert_eq!(
        s.expectation(true, Some(&old)).outcome,
        OutcomeKind::Timeout
    );
    // No hello: nothing is known to be missing.
    assert_eq!(s.expectation(true, None).outcome, OutcomeKind::Panic);
    // A requirement that is also an alternative is a contradiction.
    let e = Scenario::parse(&text.replace("memory-failure", "panic-sysctl")).unwrap_err();
    assert!(e.contains("can never apply"), "{e}");
    let e = Scenario::parse(&text.replace("\"memory-failure\"", "\"warp\"")).unwrap_err();
    assert!(e.contains("unknown variant"), "{e}");
}

#[test]
fn bad_files_are_one_line_errors() {
    for (text, want) in [
        ("name = 1", "line 1"),
        ("name = \"x\"\nsteps = [\"reboot\"]\n[expect]\noutcome = \"poweroff\"", "step 1: Bad step 'reboot'"),
        ("name = \"x\"\nsteps = []\n[expect]\noutcome = \"crashed\"", "unknown variant"),
        ("name = \"x\"\nsteps = []\nfrobnicate = 1\n[expect]\noutcome = \"panic\"", "unknown field"),
        (
            "name = \"x\"\nsteps = []\n[expect]\noutcome = \"panic\"\nsignals = [{code = \"SEGV\", page = \"page0\"}]",
            "unknown signal code",
        ),
        ("name = \"x\"\nsteps = []\n[guest]\ntimeout_s = nan\n[expect]\noutcome = \"panic\"", "guest.timeout_s: Timeout"),
        ("name = \"x\"\nsteps = []\n[guest]\ntimeout_s = -40\n[expect]\noutcome = \"panic\"", "guest.timeout_s"),
        ("name = \"x\"\nsteps = []\n[guest]\ntimeout_s = inf\n[expect]\noutcome = \"panic\"", "guest.timeout_s"),
        ("name = \"x\"\nsteps = []\n[guest]\ntimeout_s = 1e30\n[expect]\noutcome = \"panic\"", "guest.timeout_s"),
    ] {
        let e = Scenario::parse(text).unwrap_err();
        assert!(e.contains(want), "{e}");
        assert!(!e.contains('\n'), "{e:?}");
    }
}

/// A scenario names what its steps use of the guest kernel: a kernel
/// that lacks it must make the scenario `n/a`, not fail it.
fn states_its_needs(s: &Scenario) {
    use crate::steps::{parse, Step};
    use KernelFeature::*;
    let needs = |f: KernelFeature| s.requires.contains(&f) || s.expect_without.contains_key(&f);
    let kho_off = s.guest.append.as_deref().unwrap_or("").contains("kho=off");
    let wants = |step: &Step| -> Vec<KernelFeature> {
        match step {
            Step::Agent { cmd, .. } => match cmd {
                Command::Sysctl { name, .. }
                    if name == "vm.panic_on_unrecoverable_memory_failure" =>
                {
                    vec![PanicSysctl]
                }
                Command::Kexec { .. } | Command::KexecLoad { .. } => vec![KexecFile],
                Command::GuestPoison { .. } => vec![HwpoisonInject],
                Command::KernelPages { poison: true, .. } => vec![HwpoisonInject],
                _ => vec![],
            },
            Step::GhesMemory { .. } | Step::GhesRaw { .. } => vec![Ghes],
            Step::GuestPoison { .. } => vec![HwpoisonInject],
            Step::KhoScan | Step::KhoCorrupt(_) if !kho_off => vec![Kho, KhoHwpoison],
            _ => vec![],
        }
    };
    for text in &s.steps {
        // A step under `if <feature>:` may use that feature; the rest
        // of what it uses must be required.
        let (guard, step) = match parse(text).unwrap() {
            Step::When { feature, step } => (Some(feature), *step),
            step => (None, step),
        };
        for f in wants(&step) {
            assert!(
                guard == Some(f) || needs(f),
                "{}: step '{text}' needs '{}' in requires",
                s.name,
                f.name()
            );
        }
    }
    if s.expect.kho.is_some() && !kho_off {
        assert!(
            needs(KhoHwpoison),
            "{}: expect.kho needs kho-hwpoison",
            s.name
        );
    }
}

#[test]
fn every_scenario_in_the_repository_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut dirs = vec![root];
    let mut n = 0;
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                // scenarios/matrix holds kernels files (the lab's).
                if !p.ends_with("matrix") {
                    dirs.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "toml") {
                let s = Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
                states_its_needs(&s);
                n += 1;
            }
        }
    }
    assert!(n > 20, "{n} scenario files");
}

#[test]
fn exec_expectations_name_exec_steps() {
    let with = |exec: &str| {
        Scenario::parse(&format!(
            "name = \"x\"\nsteps = [\"alloc-page\", \"exec:true\", \"if einj: exec:true\"]\n\
             [expect]\noutcome = \"poweroff\"\nexec = {{ {exec} }}"
        ))
    };
    assert!(with("2 = { status = 0 }").is_ok());
    assert!(with("3 = { status = 0 }").is_ok());
    assert_eq!(
        with("1 = { status = 0 }").unwrap_err(),
        "expect.exec.1: step 1 is not an exec step"
    );
    assert_eq!(
        with("9 = { status = 0 }").unwrap_err(),
        "expect.exec.9: there is no step 9 (the scenario has 3)"
    );
    assert!(with("two = { status = 0 }").is_err());
}
