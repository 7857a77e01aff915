//! The boot expectations: how each boot ended, what its reset did to the
//! poisoned pages, and which pages the guest consumed during it.

use crate::event::RasEvent;
use crate::report::{BootRecord, RunReport};
use crate::scenario::ExpectBoot;
use crate::steps::{Refs, Target};
use ras::ledger::Fate;

/// Checks `[[expect.boots]]` against the report's boots.
pub(super) fn check_boots(
    want: &[ExpectBoot],
    report: &RunReport,
    refs: &Refs,
    f: &mut Vec<String>,
) {
    if want.len() != report.boots.len() {
        let ends: Vec<&str> = report.boots.iter().map(|b| b.end.name()).collect();
        f.push(format!(
            "the guest booted {} times ({}), expected {}",
            report.boots.len(),
            ends.join(", "),
            want.len()
        ));
    }
    for (w, b) in want.iter().zip(&report.boots) {
        check_boot(w, b, report, refs, f);
    }
}

fn check_boot(
    w: &ExpectBoot,
    b: &BootRecord,
    report: &RunReport,
    refs: &Refs,
    f: &mut Vec<String>,
) {
    let i = b.index;
    if let Some(end) = &w.end {
        if b.end.name() != end {
            f.push(format!(
                "boot {i} ended by {}, expected {end}",
                b.end.name()
            ));
        }
    }
    if let Some(d) = &w.detail_contains {
        match super::substitute(d, refs) {
            Ok(want) if !b.end.detail().contains(&want) => f.push(format!(
                "boot {i} ended with '{}', which does not contain '{want}'",
                b.end.detail()
            )),
            Ok(_) => {}
            Err(e) => f.push(e),
        }
    }
    if let Some(agent) = w.agent {
        if agent != b.agent_ready_ms.is_some() {
            f.push(format!(
                "boot {i}: the agent {} said hello",
                if agent { "never" } else { "unexpectedly" }
            ));
        }
    }
    for (names, fate) in [(&w.remapped, Fate::Remapped), (&w.kept, Fate::Kept)] {
        for name in names {
            match refs.gpa(&Target::Ref(name.clone())) {
                Err(e) => f.push(e),
                Ok(gpa) => match b.pages.iter().find(|p| p.gpa == gpa) {
                    Some(p) if p.fate == fate => {}
                    Some(p) => f.push(format!(
                        "boot {i}'s reset left {name} ({gpa:#x}) {:?}, expected {fate:?}",
                        p.fate
                    )),
                    None => f.push(format!(
                        "boot {i}'s reset found no ledger entry for {name} ({gpa:#x})"
                    )),
                },
            }
        }
    }
    for name in &w.consumed {
        match refs.gpa(&Target::Ref(name.clone())) {
            Err(e) => f.push(e),
            Ok(gpa) => {
                let during = report.ras_events.iter().any(|e| {
                    matches!(e, RasEvent::Consumed { gpa: g, at_ms, .. }
                        if *g == gpa && (b.started_ms..=b.ended_ms).contains(at_ms))
                });
                if !during {
                    f.push(format!(
                        "the guest did not consume {name} ({gpa:#x}) during boot {i}"
                    ));
                }
            }
        }
    }
}
