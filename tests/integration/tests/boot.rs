//! Boot scenarios: a real Linux 7.3 guest under rasvmm reaches its agent,
//! and every way a run can end is classified.
//!
//! The scenarios share one lab-host boot (each is its own rasvmm run in it),
//! which keeps the suite fast on machines where the lab host is emulated.

use std::sync::OnceLock;
use std::time::Duration;

use lab::{Job, JobResult, Lab, RunResult};
use serde_json::Value;

const POWEROFF: usize = 0;
const SYSRQ: usize = 1;
const TIMEOUT: usize = 2;
const AMD: usize = 3;
const ELF: usize = 4;
const SPIN_TIMEOUT_S: u64 = 15;

#[rustfmt::skip]
fn job() -> Job {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let spin_timeout = SPIN_TIMEOUT_S.to_string();
    Job {
        runs: vec![
            // POWEROFF: two vCPUs and every agent command.
            s(&["--vcpus", "2",
                "--agent", "exec:nproc",
                "--agent", "exec:grep -m1 vendor_id /proc/cpuinfo",
                "--agent", "alloc-page",
                "--agent", "kernel-pages:slab:2",
                "--agent", "page-info:0x1000",
                "--agent", "sysctl:vm.panic_on_unrecoverable_memory_failure=1",
                "--agent", "touch-page:7",
                "--agent", "poweroff"]),
            // SYSRQ
            s(&["--expect", "panic", "--agent", "exec:echo c > /proc/sysrq-trigger"]),
            // TIMEOUT
            s(&["--expect", "timeout", "--timeout", &spin_timeout,
                "--agent", "exec:while :; do :; done"]),
            // AMD
            s(&["--cpu", "amd", "--agent", "exec:grep -m1 vendor_id /proc/cpuinfo",
                "--agent", "poweroff"]),
            // ELF
            s(&["--kernel", lab::VMLINUX_PLACEHOLDER, "--agent", "exec:uname -r",
                "--agent", "poweroff"]),
        ],
        timeout: Duration::from_secs(240),
        files: Vec::new(),
        run_limits: Vec::new(),
        silence_limit: None,
    }
}

fn results() -> &'static JobResult {
    static RESULT: OnceLock<Result<JobResult, String>> = OnceLock::new();
    let r = RESULT.get_or_init(|| {
        let lab = Lab::new().map_err(|e| format!("{e} ({:?})", std::error::Error::source(&e)))?;
        lab::progress(&format!("boot scenarios on {}", lab.backend));
        lab.run(&job())
            .map_err(|e| format!("{e} ({:?})", std::error::Error::source(&e)))
    });
    match r {
        Ok(r) => r,
        Err(e) => panic!("the boot scenarios could not run: {e}"),
    }
}

fn run(i: usize) -> (&'static RunResult, &'static Value) {
    let r = &results().runs[i];
    let report = r
        .report
        .as_ref()
        .unwrap_or_else(|| panic!("no report:\n{r}"));
    (r, report)
}

fn step(report: &Value, n: usize) -> &Value {
    &report["steps"][n]
}

#[test]
fn guest_reaches_agent_and_powers_off() {
    let (r, rep) = run(POWEROFF);
    assert_eq!(r.outcome(), "poweroff", "{r}");
    assert_eq!(r.exit, 0, "{r}");
    assert!(rep["agent_ready_ms"].as_u64().is_some(), "{r}");
    assert!(
        rep["guest_kernel"]
            .as_str()
            .unwrap_or("")
            .starts_with("7.3"),
        "{rep}"
    );
    assert_eq!(step(rep, 7)["reply"], "done", "poweroff acknowledged");
}

#[test]
fn two_vcpus_are_visible_in_the_guest() {
    let (r, rep) = run(POWEROFF);
    assert_eq!(rep["guest_cpus"], 2, "{r}");
    assert_eq!(step(rep, 0)["reply"]["exec"]["stdout"], "2\n", "{r}");
}

#[test]
fn intel_profile_presents_genuine_intel() {
    let (r, rep) = run(POWEROFF);
    let out = step(rep, 1)["reply"]["exec"]["stdout"]
        .as_str()
        .unwrap_or_default();
    assert!(out.contains("GenuineIntel"), "{out:?}\n{r}");
}

#[test]
fn amd_profile_boots_and_presents_authentic_amd() {
    let (r, rep) = run(AMD);
    assert_eq!(r.outcome(), "poweroff", "{r}");
    let out = step(rep, 0)["reply"]["exec"]["stdout"]
        .as_str()
        .unwrap_or_default();
    assert!(out.contains("AuthenticAMD"), "{out:?}\n{r}");
}

#[test]
fn agent_reports_a_user_page_and_kernel_pages() {
    let (r, rep) = run(POWEROFF);
    let page = &step(rep, 2)["reply"]["page"];
    assert!(page["pfn"].as_u64().unwrap_or(0) > 0, "{page}\n{r}");
    assert!(
        page["vaddr"].as_u64().unwrap_or(1).is_multiple_of(4096),
        "{page}"
    );
    let slab = step(rep, 3)["reply"]["kernel-pages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(slab.len(), 2, "{rep}");
    let info = &step(rep, 4)["reply"]["page-info"];
    assert_eq!(info["pfn"], 0x1000);
    assert_eq!(info["hwpoison"], false);
    assert_eq!(info["hardware_corrupted_kb"], 0);
    let sysctl = &step(rep, 5)["reply"]["sysctl"];
    assert_eq!(sysctl["name"], "vm.panic_on_unrecoverable_memory_failure");
    assert_eq!(sysctl["value"], "1");
    // A request the agent refuses is an error reply, and the run goes on.
    assert_eq!(step(rep, 6)["error"], "agent: no such page 7", "{rep}");
}

#[test]
fn sysrq_crash_is_a_panic_with_its_line_captured() {
    let (r, rep) = run(SYSRQ);
    assert_eq!(r.outcome(), "panic", "{r}");
    assert_eq!(r.exit, 0, "--expect panic");
    let detail = rep["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("Kernel panic - not syncing: "),
        "{detail}"
    );
    assert!(detail.contains("sysrq"), "{detail}");
    let log = rep["log"].as_array().cloned().unwrap_or_default();
    assert!(
        log.iter()
            .any(|l| l.as_str().unwrap_or("").contains("sysrq: Trigger a crash")),
        "the lines before the panic are captured: {log:?}"
    );
}

#[test]
fn spinning_guest_times_out_at_its_deadline() {
    let (r, rep) = run(TIMEOUT);
    assert_eq!(r.outcome(), "timeout", "{r}");
    let ms = rep["elapsed_ms"].as_u64().unwrap_or(0);
    let want = SPIN_TIMEOUT_S * 1000;
    assert!(
        (want..want + 2000).contains(&ms),
        "elapsed {ms} ms, deadline {want} ms"
    );
    // The exec never replied; the step says so.
    assert_eq!(
        step(rep, 0)["error"],
        "the run ended before the agent replied",
        "{rep}"
    );
}

#[test]
fn elf_vmlinux_boots_to_the_agent() {
    let (r, rep) = run(ELF);
    assert_eq!(r.outcome(), "poweroff", "{r}");
    let out = step(rep, 0)["reply"]["exec"]["stdout"]
        .as_str()
        .unwrap_or_default();
    assert!(out.starts_with("7.3"), "{out:?}\n{r}");
}
