//! One whole run: start the VM, perform the agent steps, classify, report.

use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use crate::config::VmConfig;
use guest_agent::{Command, KernelFeature};

use crate::report::{process_rss_kib, MemoryUse, RunReport, StepRecord, Verdict};
use crate::scenario::Scenario;
use crate::session::Session;
use crate::steps::{Step, StepError};
use crate::verdict::evaluate;
use crate::vm::{Error, Vm};

/// Extra time the watchdog allows past the deadline before it ends the
/// process itself, should the session ever fail to.
const WATCHDOG_GRACE: Duration = Duration::from_secs(10);

/// Boots the VM, performs `steps` in order (each given with its text for the
/// report), waits for the outcome and reports. A step that fails is
/// recorded and the run goes on; the guest decides how it ends.
pub fn run(config: &VmConfig, steps: &[(String, Step)]) -> Result<RunReport, Error> {
    run_expecting(config, steps, None, None)
}

/// Like [`run`], and judges the run against a scenario's expectation.
pub fn run_expecting(
    config: &VmConfig,
    steps: &[(String, Step)],
    scenario: Option<&Scenario>,
    api_socket: Option<&std::path::Path>,
) -> Result<RunReport, Error> {
    // Every thread made from here on reports host memory failures late;
    // only the VM's early-report thread asks for them early.
    crate::host_errors::late_by_default().map_err(Error::EarlyReports)?;
    // Dropping `_watchdog` at return (any return) disarms the watchdog.
    let (_watchdog, disarmed) = std::sync::mpsc::channel::<()>();
    let deadline = config.timeout + WATCHDOG_GRACE;
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            if disarmed.recv_timeout(deadline) == Err(RecvTimeoutError::Timeout) {
                eprintln!(
                    "error: rasvmm watchdog: run did not end {} s after its deadline",
                    WATCHDOG_GRACE.as_secs()
                );
                // Where each thread is, so that the log shows what hung.
                for line in thread_states() {
                    eprintln!("rasvmm watchdog: {line}");
                }
                std::process::exit(3);
            }
        })
        .map_err(Error::Spawn)?;

    let vm = Vm::start(config)?;
    let _api = match api_socket {
        Some(p) => Some(crate::api::serve(p, vm.event_sender()).map_err(Error::Api)?),
        None => None,
    };
    let mut session = Session::new(vm).map_err(Error::EventLoop)?;
    let missing = match scenario {
        Some(s) if !s.requires.is_empty() => not_offered(&mut session, s),
        _ => Vec::new(),
    };
    let steps = if missing.is_empty() { steps } else { &[] };
    let mut records = Vec::new();
    for (text, step) in steps {
        let result = session.perform(step, std::time::Instant::now());
        let at_ms = ms(session.elapsed());
        let (reply, error) = match result {
            Ok(p) => (p, None),
            Err(e) => (None, Some(e)),
        };
        records.push(StepRecord {
            step: text.clone(),
            reply,
            // The end of the run, or of the boot the step's agent ran in.
            cut_short: matches!(error, Some(StepError::Ended | StepError::Rebooted)),
            error: error.map(|e| e.to_string()),
            at_ms,
        });
    }
    let outcome = session.wait_outcome();
    if session.has_subscribers() {
        // Let connection threads deliver the outcome event before the
        // socket goes away with the run.
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut report = RunReport::new(outcome, config.cpu.name, config.vcpus, config.memory_mib);
    report.elapsed_ms = ms(session.elapsed());
    if let Some((hello, at)) = session.hello() {
        report.agent_ready_ms = Some(ms(*at));
        report.guest_kernel = Some(hello.kernel.clone());
        report.guest_cpus = Some(hello.cpus);
        report.guest_features = hello.features.clone();
    }
    report.steps = records;
    let console = std::mem::take(&mut session.console);
    report.console_dropped = console.dropped;
    report.console = console.into_lines();
    report.signals = std::mem::take(&mut session.signals);
    report.signal_ms = std::mem::take(&mut session.signal_ms);
    report.agent_errors = std::mem::take(&mut session.agent_errors);
    report.ras_events = std::mem::take(&mut session.ras_events);
    report.ledger = session.vm().ras().ledger();
    report.boots = session.boot_records();
    report.ghes = session.vm().ras().ghes_state();
    (report.mcg_cap, report.mcg_cap_supplied) = session.vm().ras().mcg_cap();
    report.ras_limitation = session.vm().ras().ras_limitation();
    if let Some(s) = scenario {
        report.scenario = Some(s.name.clone());
        let recoverable = report.ras_limitation.is_none();
        let features = report.guest_features.as_deref();
        report.verdict = Some(if missing.is_empty() {
            evaluate(s.expectation(recoverable, features), &report, &session.refs)
        } else {
            Verdict::not_applicable(&missing)
        });
    }
    let rss = process_rss_kib();
    let guest = session.vm().guest_resident_kib();
    report.memory_use = MemoryUse {
        rss_kib: rss,
        guest_resident_kib: guest,
        vmm_overhead_kib: rss.saturating_sub(guest),
    };
    Ok(report)
}

/// What `scenario` requires that the guest kernel lacks, by its agent's
/// hello. If it lacks anything, the guest is powered off: the scenario's
/// steps are not run. A guest whose agent never says hello, or does not
/// say what its kernel offers, lacks nothing known: its steps run, and
/// fail on their own.
fn not_offered(session: &mut Session, scenario: &Scenario) -> Vec<KernelFeature> {
    if session.wait_agent().is_none() {
        return Vec::new();
    }
    let missing: Vec<KernelFeature> = scenario
        .requires
        .iter()
        .copied()
        .filter(|f| session.lacks(*f))
        .collect();
    if !missing.is_empty() {
        // The run's outcome is then the guest's poweroff (or whatever ends
        // it first); the verdict does not depend on it.
        let poweroff = Step::Agent {
            cmd: Command::Poweroff,
            pfn: None,
            bind: None,
        };
        let _ = session.perform(&poweroff, std::time::Instant::now());
    }
    missing
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One line per thread of this process: its name, state, and the system
/// call it is in with its first argument (/proc/self/task/*/syscall: on
/// x86_64 202 is futex, a lock; 232 epoll_wait; on arm64 98 is futex, 22
/// epoll_pwait), for the watchdog's diagnosis.
fn thread_states() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return vec!["(no /proc/self/task)".into()];
    };
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    dir.flatten()
        .take(256)
        .map(|t| {
            let state = read(t.path().join("status"))
                .lines()
                .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_string()))
                .unwrap_or_default();
            let syscall: Vec<String> = read(t.path().join("syscall"))
                .split_whitespace()
                .take(2)
                .map(String::from)
                .collect();
            format!(
                "thread {} ({}): {state}, syscall {}",
                read(t.path().join("comm")).trim(),
                t.file_name().to_string_lossy(),
                syscall.join(" ")
            )
        })
        .collect()
}
