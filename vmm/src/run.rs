//! One whole run: start the VM, perform the agent steps, classify, report.

use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use guest_agent::Command;

use crate::config::VmConfig;
use crate::report::{process_rss_kib, MemoryUse, RunReport, StepRecord};
use crate::vm::{Error, Session, Vm};

/// Extra time the watchdog allows past the deadline before it ends the
/// process itself, should the session ever fail to.
const WATCHDOG_GRACE: Duration = Duration::from_secs(10);

/// Boots the VM, runs `steps` through the agent in order, waits for the
/// outcome and reports. A step that fails is recorded and the run goes on;
/// the guest decides how it ends.
pub fn run(config: &VmConfig, steps: &[Command]) -> Result<RunReport, Error> {
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
                std::process::exit(3);
            }
        })
        .map_err(Error::Spawn)?;

    let vm = Vm::start(config)?;
    let mut session = Session::new(vm);
    let mut records = Vec::new();
    for cmd in steps {
        let result = session.call(cmd.clone());
        let at_ms = ms(session.elapsed());
        let (reply, error) = match result {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e.to_string())),
        };
        records.push(StepRecord {
            request: cmd.clone(),
            reply,
            error,
            at_ms,
        });
    }
    let outcome = session.wait_outcome();
    let mut report = RunReport::new(outcome, config.cpu.name, config.vcpus, config.memory_mib);
    report.elapsed_ms = ms(session.elapsed());
    if let Some((hello, at)) = session.hello() {
        report.agent_ready_ms = Some(ms(*at));
        report.guest_kernel = Some(hello.kernel.clone());
        report.guest_cpus = Some(hello.cpus);
    }
    report.steps = records;
    report.signals = std::mem::take(&mut session.signals);
    report.agent_errors = std::mem::take(&mut session.agent_errors);
    let rss = process_rss_kib();
    let guest = session.vm().guest_resident_kib();
    report.memory_use = MemoryUse {
        rss_kib: rss,
        guest_resident_kib: guest,
        vmm_overhead_kib: rss.saturating_sub(guest),
    };
    Ok(report)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
