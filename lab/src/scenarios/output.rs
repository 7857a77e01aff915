//! The suite's verdicts for people and CI: the table `rasvmm-lab suite`
//! prints (per kernel, and the matrix of every kernel), its progress lines,
//! and the JUnit XML it writes.

use super::{ScenarioResult, Status};

/// The verdict table, one scenario a line, failures beneath.
pub fn table(results: &[ScenarioResult]) -> String {
    let mut s = format!(
        "{:<38} {:<6} {:<22} {:<8} {:>7}\n",
        "scenario", "cpu", "outcome", "verdict", "time"
    );
    for r in results {
        s += &format!(
            "{:<38} {:<6} {:<22} {:<8} {:>6.1}s\n",
            r.name,
            r.cpu,
            r.outcome,
            r.label(),
            r.seconds
        );
        for v in &r.views {
            s += &format!("    {v}\n");
        }
        for f in &r.failures {
            s += &format!("    - {f}\n");
        }
        for f in &r.not_applicable {
            s += &format!("    - the guest kernel lacks {f}\n");
        }
        if let Some(why) = &r.retried {
            s += &format!("    ~ retried once: {why}\n");
        }
        for d in &r.diagnosis {
            s += &format!("      | {d}\n");
        }
    }
    s
}

/// One line for a scenario that has just finished: `[n/N]`, kernel,
/// scenario, CPU profile, verdict, time.
pub fn progress_line(r: &ScenarioResult, n: usize, total: usize) -> String {
    let width = total.to_string().len();
    format!(
        "[{n:>width$}/{total}] {:<20} {:<38} {:<6} {:<5} {:>6.1}s",
        r.kernel,
        r.name,
        r.cpu,
        r.label(),
        r.seconds
    )
}

/// Counts of passed, failed and n/a.
pub fn counts(results: &[ScenarioResult]) -> (usize, usize, usize) {
    let n = |s| results.iter().filter(|r| r.status() == s).count();
    (
        n(Status::Passed),
        n(Status::Failed),
        n(Status::NotApplicable),
    )
}

/// The matrix: a row per scenario (and CPU profile), a column per kernel
/// (in `kernels` order), each cell the verdict (`-`: not run on that
/// kernel); beneath, what each n/a lacked, and the counts per kernel.
pub fn matrix(results: &[ScenarioResult], kernels: &[String]) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    for r in results {
        let key = (r.name.clone(), r.cpu.clone());
        if !rows.contains(&key) {
            rows.push(key);
        }
    }
    let width = kernels.iter().map(|k| k.len().max(5)).collect::<Vec<_>>();
    let mut s = format!("{:<38} {:<6}", "scenario", "cpu");
    for (k, w) in kernels.iter().zip(&width) {
        s += &format!(" {k:<w$}");
    }
    s.push('\n');
    for (name, cpu) in &rows {
        s += &format!("{name:<38} {cpu:<6}");
        for (k, w) in kernels.iter().zip(&width) {
            let cell = results
                .iter()
                .find(|r| &r.name == name && &r.cpu == cpu && &r.kernel == k)
                .map_or("-", ScenarioResult::label);
            s += &format!(" {cell:<w$}");
        }
        s.push('\n');
    }
    let mut lacks: Vec<(String, String)> = Vec::new();
    for r in results
        .iter()
        .filter(|r| r.status() == Status::NotApplicable)
    {
        for f in &r.not_applicable {
            let key = (r.kernel.clone(), f.clone());
            if !lacks.contains(&key) {
                lacks.push(key);
            }
        }
    }
    for (k, f) in &lacks {
        s += &format!("n/a on {k}: it lacks {f}\n");
    }
    for k in kernels {
        let mine: Vec<ScenarioResult> =
            results.iter().filter(|r| &r.kernel == k).cloned().collect();
        let (p, f, na) = counts(&mine);
        s += &format!("{k}: {p} passed, {f} failed, {na} n/a\n");
    }
    let (p, f, na) = counts(results);
    s += &format!(
        "matrix: {} runs on {} kernels: {p} passed, {f} failed, {na} n/a\n",
        results.len(),
        kernels.len()
    );
    s
}

/// JUnit XML for CI: suite `rasvmm.<arch>`, one test case per scenario and
/// kernel (`name [kernel/cpu]`), classed by kernel and CPU profile; an n/a
/// is a skipped case whose message names what the kernel lacks.
pub fn junit(results: &[ScenarioResult], wall: f64, arch: crate::Arch) -> String {
    let (_, failed, skipped) = counts(results);
    let arch = arch.name();
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"rasvmm.{arch}\" tests=\"{}\" failures=\"{failed}\" skipped=\"{skipped}\" time=\"{wall:.1}\">\n",
        results.len()
    );
    for r in results {
        x += &format!(
            "  <testcase classname=\"rasvmm.{arch}.{}.{}\" name=\"{} [{}/{}]\" time=\"{:.1}\">\n",
            xml(&r.kernel).replace('.', "_"),
            xml(&r.cpu),
            xml(&r.name),
            xml(&r.kernel),
            xml(&r.cpu),
            r.seconds
        );
        if r.status() == Status::NotApplicable {
            x += &format!(
                "    <skipped message=\"n/a: the guest kernel lacks {}\"/>\n",
                xml(&r.not_applicable.join("; "))
            );
        } else if !r.passed {
            x += &format!(
                "    <failure message=\"{}\">{}</failure>\n",
                xml(r.failures.first().map_or("failed", String::as_str)),
                xml(&[r.failures.as_slice(), r.diagnosis.as_slice()]
                    .concat()
                    .join("\n"))
            );
        }
        if let Some(why) = &r.retried {
            // Surefire's rerun format: the attempt that did not count.
            x += &format!(
                "    <flakyFailure message=\"{}\">{}</flakyFailure>\n",
                xml(why),
                xml(why)
            );
        }
        x += &format!(
            "    <system-out>outcome: {}</system-out>\n  </testcase>\n",
            xml(&r.outcome)
        );
    }
    x + "</testsuite>\n"
}

/// Escapes text for XML, dropping control characters.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::diagnosis;
    use super::*;

    fn result(passed: bool) -> ScenarioResult {
        ScenarioResult {
            name: "a<b".into(),
            kernel: "k-1.0".into(),
            not_applicable: vec![],
            features: None,
            cpu: "amd".into(),
            outcome: "panic".into(),
            passed,
            failures: if passed {
                vec![]
            } else {
                vec!["outcome is \"x\"".into()]
            },
            retried: None,
            diagnosis: if passed {
                vec![]
            } else {
                vec!["console/vCPU: rasvmm: vCPU 1 when it stopped: rip 0x1".into()]
            },
            views: Vec::new(),
            seconds: 1.5,
            report: Value::Null,
        }
    }

    #[test]
    fn xml_is_escaped_and_control_free() {
        assert_eq!(xml("a<b>&\"c'\u{1b}[0m"), "a&lt;b&gt;&amp;&quot;c&apos;[0m");
    }

    #[test]
    fn a_failure_shows_its_diagnosis() {
        let t = table(&[result(true), result(false)]);
        assert_eq!(
            t.matches("| console/vCPU: rasvmm: vCPU 1").count(),
            1,
            "{t}"
        );
        let x = junit(&[result(false)], 1.0, crate::Arch::X86_64);
        assert!(x.contains("vCPU 1 when it stopped"), "{x}");
        let log = ["a", "b", "rasvmm: vCPU 0 at the deadline: rip 0x2"].map(String::from);
        let d = diagnosis(&log, "line1\n\nerror: boom\n");
        assert_eq!(d.len(), 5, "{d:?}");
        assert_eq!(
            d[2],
            "console/vCPU: rasvmm: vCPU 0 at the deadline: rip 0x2"
        );
        assert_eq!(d[4], "rasvmm stderr: error: boom");
    }

    #[test]
    fn the_matrix_shows_each_kernel_and_what_it_lacks() {
        let mut na = result(false);
        na.kernel = "old".into();
        na.failures.clear();
        na.diagnosis.clear();
        na.not_applicable = vec!["panic-sysctl: the sysctl".into()];
        let mut other = result(true);
        other.name = "b".into();
        let all = [result(true), na.clone(), other];
        let kernels = ["k-1.0".to_string(), "old".to_string()];
        let m = matrix(&all, &kernels);
        let lines: Vec<&str> = m.lines().collect();
        assert!(
            lines[0].contains("k-1.0") && lines[0].contains("old"),
            "{m}"
        );
        assert!(
            lines[1].starts_with("a<b") && lines[1].contains("PASS  n/a"),
            "{m}"
        );
        assert!(
            lines[2].starts_with("b ") && lines[2].trim_end().ends_with('-'),
            "{m}"
        );
        assert!(
            m.contains("n/a on old: it lacks panic-sysctl: the sysctl"),
            "{m}"
        );
        assert!(m.contains("old: 0 passed, 0 failed, 1 n/a"), "{m}");
        assert!(
            m.contains("matrix: 3 runs on 2 kernels: 2 passed, 0 failed, 1 n/a"),
            "{m}"
        );
        let x = junit(&all, 1.0, crate::Arch::X86_64);
        assert!(
            x.contains("skipped=\"1\"") && x.contains("failures=\"0\""),
            "{x}"
        );
        assert!(x.contains("name=\"a&lt;b [old/amd]\""), "{x}");
        assert!(
            x.contains("<skipped message=\"n/a: the guest kernel lacks panic-sysctl"),
            "{x}"
        );
        assert!(x.contains("classname=\"rasvmm.x86_64.k-1_0.amd\""), "{x}");
        assert_eq!(
            progress_line(&na, 3, 12),
            format!(
                "[ 3/12] {:<20} {:<38} {:<6} {:<5} {:>6.1}s",
                "old", "a<b", "amd", "n/a", 1.5
            )
        );
        assert!(table(&[na]).contains("- the guest kernel lacks panic-sysctl"));
    }

    #[test]
    fn junit_counts_failures() {
        let x = junit(&[result(true), result(false)], 9.0, crate::Arch::Aarch64);
        assert!(x.contains("<testsuite name=\"rasvmm.aarch64\""), "{x}");
        assert!(x.contains("tests=\"2\" failures=\"1\""), "{x}");
        assert!(x.contains("name=\"a&lt;b [k-1.0/amd]\""));
        assert_eq!(x.matches("<failure").count(), 1);
        assert!(x.contains("message=\"outcome is &quot;x&quot;\""));
    }
}
