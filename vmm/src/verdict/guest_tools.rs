//! The guest-tool expectations: the EINJ requests the guest made and
//! rasvmm's answers, what `exec` steps returned, and what rasdaemon
//! recorded.

use guest_agent::Payload;

use crate::event::RasEvent;
use crate::report::{RunReport, StepReply};
use crate::scenario::{ExpectEinj, ExpectExec, ExpectRasdaemon};
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
                Some(pfn) if gpa.is_none() || *gpa != pfn.checked_mul(4096) => f.push(format!(
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

/// Checks `rasdaemon` against the last `rasdaemon` step's view.
pub(super) fn check_rasdaemon(
    want: &ExpectRasdaemon,
    report: &RunReport,
    refs: &Refs,
    f: &mut Vec<String>,
) {
    let Some(view) = report.steps.iter().rev().find_map(|s| match &s.reply {
        Some(StepReply::Agent(Payload::Rasdaemon(v))) => Some(v),
        _ => None,
    }) else {
        f.push("no rasdaemon step read rasdaemon's records".into());
        return;
    };
    let log = || match view.log_tail.last() {
        Some(l) => format!("; its log ends: {l}"),
        None => String::new(),
    };
    if !view.running {
        f.push(format!("rasdaemon is not running in the guest{}", log()));
        return;
    }
    if view.rows() == 0 {
        f.push(format!("rasdaemon recorded nothing{}", log()));
        return;
    }
    // A page an entry names: Ok(None) if it names none, Err if it names
    // one never reported (said once, and the entry skipped).
    let page_of = |name: Option<&String>, f: &mut Vec<String>| match name {
        None => Ok(None),
        Some(n) => match refs.named_pfn(n) {
            Some(pfn) => Ok(Some(pfn)),
            None => {
                f.push(format!("'{n}' was never reported"));
                Err(())
            }
        },
    };
    for w in &want.mce_record {
        let Ok(page) = page_of(w.page.as_ref(), f) else {
            continue;
        };
        let found = view.mce_record.iter().any(|r| {
            w.bank.is_none_or(|b| b == r.bank)
                && w.status.is_none_or(|s| s == r.status)
                && page.is_none_or(|pfn| r.addr >> 12 == pfn)
        });
        if !found {
            f.push(format!(
                "rasdaemon has no mce_record{}{}{}; it has {}",
                w.bank.map(|b| format!(" in bank {b}")).unwrap_or_default(),
                w.status
                    .map(|s| format!(" with status {s:#x}"))
                    .unwrap_or_default(),
                w.page
                    .as_ref()
                    .map(|p| format!(" at {p}"))
                    .unwrap_or_default(),
                list(
                    view.mce_record.iter().map(|r| format!(
                        "bank {} status {:#x} addr {:#x}",
                        r.bank, r.status, r.addr
                    ))
                )
            ));
        }
    }
    for w in &want.mc_event {
        let Ok(page) = page_of(w.page.as_ref(), f) else {
            continue;
        };
        let found = view.mc_event.iter().any(|r| {
            w.err_type.as_ref().is_none_or(|t| *t == r.err_type)
                && page.is_none_or(|pfn| r.address >> 12 == pfn)
        });
        if !found {
            f.push(format!(
                "rasdaemon has no mc_event{}{}; it has {}",
                w.err_type
                    .as_ref()
                    .map(|t| format!(" of type {t}"))
                    .unwrap_or_default(),
                w.page
                    .as_ref()
                    .map(|p| format!(" at {p}"))
                    .unwrap_or_default(),
                list(
                    view.mc_event
                        .iter()
                        .map(|r| format!("{} at {:#x}", r.err_type, r.address))
                )
            ));
        }
    }
    for w in &want.memory_failure {
        let Ok(Some(pfn)) = page_of(Some(&w.page), f) else {
            continue;
        };
        let found = view.memory_failure_event.iter().any(|r| {
            r.pfn == pfn
                && w.page_type.as_ref().is_none_or(|t| *t == r.page_type)
                && w.action_result
                    .as_ref()
                    .is_none_or(|a| *a == r.action_result)
        });
        if !found {
            f.push(format!(
                "rasdaemon has no memory_failure_event for {} ({pfn:#x}){}{}; it has {}",
                w.page,
                w.page_type
                    .as_ref()
                    .map(|t| format!(", {t}"))
                    .unwrap_or_default(),
                w.action_result
                    .as_ref()
                    .map(|a| format!(", {a}"))
                    .unwrap_or_default(),
                list(
                    view.memory_failure_event
                        .iter()
                        .map(|r| format!("{:#x} {}: {}", r.pfn, r.page_type, r.action_result))
                )
            ));
        }
    }
}

/// Rows for a failure message: `none`, or the rows joined.
fn list(rows: impl Iterator<Item = String>) -> String {
    let rows: Vec<String> = rows.collect();
    if rows.is_empty() {
        "none".into()
    } else {
        rows.join("; ")
    }
}
