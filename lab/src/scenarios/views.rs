//! rasdaemon's view beside rasvmm's, for a scenario that expects rasdaemon
//! records: what rasvmm reported or poisoned, and what rasdaemon recorded
//! (the last `rasdaemon` step's read of its database), a line each under
//! the scenario's row in the verdict table.

use guest_agent::Payload;
use vmm::event::RasEvent;
use vmm::report::{RunReport, StepReply};
use vmm::scenario::Scenario;

/// Longest part list shown on one line.
const MAX_PARTS: usize = 8;

/// The two lines, if the scenario asks for rasdaemon's records.
pub(super) fn views(s: &Scenario, report: &RunReport) -> Vec<String> {
    if s.expect.rasdaemon.is_none() {
        return Vec::new();
    }
    let rasvmm: Vec<String> = report
        .ras_events
        .iter()
        .filter_map(|e| match e {
            RasEvent::Poisoned { gpa, .. } => Some(format!("poisoned {gpa:#x}")),
            RasEvent::Injected { error, gpa, .. } => {
                Some(format!("{} at {gpa:#x}", error.as_str()))
            }
            // An arm64 consumption is an SEA with a GHES record.
            RasEvent::Consumed {
                error,
                gpa,
                ghes: None,
                ..
            } => Some(format!("consumed {gpa:#x}: {}", error.as_str())),
            RasEvent::Consumed {
                gpa,
                ghes: Some(source),
                ..
            } => Some(format!("consumed {gpa:#x}: ghes {}", source.as_str())),
            RasEvent::GhesReported {
                source,
                severity,
                gpa,
                ..
            } => Some(format!(
                "ghes {} {} at {}",
                source.as_str(),
                severity.as_str(),
                gpa.map_or("-".into(), |a| format!("{a:#x}"))
            )),
            RasEvent::GuestEinj {
                request,
                gpa,
                status,
                ..
            } => Some(format!(
                "einj {:#x} at {}: {}",
                request.error_type,
                gpa.map_or("-".into(), |a| format!("{a:#x}")),
                status.as_str()
            )),
            _ => None,
        })
        .collect();
    let view = report.steps.iter().rev().find_map(|s| match &s.reply {
        Some(StepReply::Agent(Payload::Rasdaemon(v))) => Some(v),
        _ => None,
    });
    let rasdaemon: Vec<String> = match view {
        None => vec!["not read".into()],
        Some(v) if !v.running => vec!["not running".into()],
        Some(v) => v
            .mce_record
            .iter()
            .map(|r| {
                format!(
                    "mce_record bank {} status {:#x} addr {:#x}",
                    r.bank, r.status, r.addr
                )
            })
            .chain(
                v.mc_event
                    .iter()
                    .map(|r| format!("mc_event {} at {:#x}", r.err_type, r.address)),
            )
            .chain(v.memory_failure_event.iter().map(|r| {
                format!(
                    "memory_failure {:#x} {}: {}",
                    r.pfn, r.page_type, r.action_result
                )
            }))
            .collect(),
    };
    vec![
        format!("rasvmm:    {}", join(&rasvmm)),
        format!("rasdaemon: {}", join(&rasdaemon)),
    ]
}

fn join(parts: &[String]) -> String {
    if parts.is_empty() {
        return "nothing".into();
    }
    let mut s = parts[..parts.len().min(MAX_PARTS)].join("; ");
    if parts.len() > MAX_PARTS {
        s += &format!("; and {} more", parts.len() - MAX_PARTS);
    }
    s
}
