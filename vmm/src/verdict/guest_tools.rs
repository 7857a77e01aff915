//! The guest-tool expectations: the EINJ requests the guest made and
//! rasvmm's answers, and what `exec` steps returned.

use guest_agent::Payload;

use crate::event::RasEvent;
use crate::report::{RunReport, StepReply};
use crate::scenario::{ExpectEinj, ExpectExec};
use crate::steps::Refs;

/// Checks `einj` against the GuestEinj events, in order.
pub(super) fn check_einj(
    want: &[ExpectEinj],
    report: &RunReport,
    refs: &Refs,
    f: &mut Vec<String>,
) {
    let got: Vec<_> = report
        .ras_events
        .iter()
        .filter_map(|e| match e {
            RasEvent::GuestEinj {
                request,
                gpa,
                status,
                reason,
                ..
            } => Some((request.error_type, *gpa, *status, reason.as_deref())),
            _ => None,
        })
        .collect();
    if got.len() != want.len() {
        f.push(format!(
            "the guest made {} EINJ requests, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (w, (error_type, gpa, status, reason))) in want.iter().zip(&got).enumerate() {
        let n = i + 1;
        if w.error_type != *error_type {
            f.push(format!(
                "EINJ request {n} asked for error type {error_type:#x}, expected {:#x}",
                w.error_type
            ));
        }
        if w.status != *status {
            let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
            f.push(format!(
                "EINJ request {n} was answered {}{why}, expected {}",
                status.as_str(),
                w.status.as_str()
            ));
        }
        if let Some(page) = &w.page {
            match refs.named_pfn(page) {
                None => f.push(format!("'{page}' was never reported")),
                Some(pfn) if *gpa != pfn.checked_mul(4096) => f.push(format!(
                    "EINJ request {n} named {}, expected {page} ({:#x})",
                    gpa.map_or("no page".to_string(), |a| format!("{a:#x}")),
                    pfn.saturating_mul(4096)
                )),
                Some(_) => {}
            }
        }
    }
}

/// Checks `exec` against the exec steps' results.
pub(super) fn check_exec(
    want: &std::collections::BTreeMap<String, ExpectExec>,
    report: &RunReport,
    f: &mut Vec<String>,
) {
    for (index, w) in want {
        let step = crate::steps::number(index)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| report.steps.get(i));
        let Some(step) = step else {
            f.push(format!("exec expectation for step {index}: no such step"));
            continue;
        };
        let Some(StepReply::Agent(Payload::Exec(r))) = &step.reply else {
            f.push(format!(
                "step {index} ({}) returned no exec result",
                step.step
            ));
            continue;
        };
        if let Some(s) = w.status {
            if r.status != s {
                f.push(format!(
                    "step {index} exited {}, expected {s}; stderr: {}",
                    r.status,
                    r.stderr.trim()
                ));
            }
        }
        for want in &w.stdout_contains {
            if !r.stdout.contains(want.as_str()) {
                f.push(format!(
                    "step {index}'s output lacks '{want}'; it was: {}",
                    r.stdout.trim()
                ));
            }
        }
    }
}
