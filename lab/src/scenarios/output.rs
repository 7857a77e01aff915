//! The suite's verdicts for people and CI: the table `rasvmm-lab suite`
//! prints and the JUnit XML it writes.

use super::ScenarioResult;

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
            if r.passed { "PASS" } else { "FAIL" },
            r.seconds
        );
        for f in &r.failures {
            s += &format!("    - {f}\n");
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

/// JUnit XML for CI: suite `rasvmm.<arch>`, one test case per scenario,
/// classed by CPU profile.
pub fn junit(results: &[ScenarioResult], wall: f64, arch: crate::Arch) -> String {
    let failed = results.iter().filter(|r| !r.passed).count();
    let arch = arch.name();
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"rasvmm.{arch}\" tests=\"{}\" failures=\"{failed}\" time=\"{wall:.1}\">\n",
        results.len()
    );
    for r in results {
        x += &format!(
            "  <testcase classname=\"rasvmm.{arch}.{}\" name=\"{}\" time=\"{:.1}\">\n",
            xml(&r.cpu),
            xml(&r.name),
            r.seconds
        );
        if !r.passed {
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
    fn junit_counts_failures() {
        let x = junit(&[result(true), result(false)], 9.0, crate::Arch::Aarch64);
        assert!(x.contains("<testsuite name=\"rasvmm.aarch64\""), "{x}");
        assert!(x.contains("tests=\"2\" failures=\"1\""), "{x}");
        assert!(x.contains("name=\"a&lt;b\""));
        assert_eq!(x.matches("<failure").count(), 1);
        assert!(x.contains("message=\"outcome is &quot;x&quot;\""));
    }
}
