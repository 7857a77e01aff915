//! The verdict: a run's typed report judged against a scenario's
//! expectation.
//!
//! Pure: it reads the [`RunReport`] (outcome, typed step replies, signals,
//! ledger, RAS events, GHES counters, KHO views) and the references the
//! steps bound, and imports neither the VM nor the vCPU code, so the same
//! verdict comes out wherever the guest ran.

use guest_agent::{PageInfo, Payload, TouchResult};

use crate::event::RasEvent;
use crate::kho_observer::{Comparison, Handoff, Hwpoison, KhoView, Pin};
use crate::report::{RunReport, StepReply, Verdict};
use crate::scenario::{signal_code, Expect, ExpectKho, KhoHandoff, KhoPin, KhoState, KhoVerdict};
use crate::steps::{Refs, Target};

/// SIGBUS.
const SIGBUS: i32 = 7;

/// The agent payloads of the run's steps, latest first.
fn payloads_rev(report: &RunReport) -> impl Iterator<Item = &Payload> {
    report.steps.iter().rev().filter_map(|s| match &s.reply {
        Some(StepReply::Agent(p)) => Some(p),
        _ => None,
    })
}

fn state_of(h: &Hwpoison) -> KhoState {
    match h {
        Hwpoison::Absent => KhoState::Absent,
        Hwpoison::Valid {
            incomplete: false, ..
        } => KhoState::Valid,
        Hwpoison::Valid {
            incomplete: true, ..
        } => KhoState::Incomplete,
        Hwpoison::Invalid { .. } => KhoState::Invalid,
        Hwpoison::Unpinned { .. } => KhoState::Unpinned,
    }
}

fn verdict_of(c: &Comparison) -> KhoVerdict {
    match c {
        Comparison::Agree => KhoVerdict::Agree,
        Comparison::Differ { .. } => KhoVerdict::Differ,
        Comparison::Incomplete { .. } => KhoVerdict::Incomplete,
        Comparison::Unknown => KhoVerdict::Unknown,
    }
}

fn pin_of(p: &Pin) -> (KhoPin, Option<KhoHandoff>) {
    match p {
        Pin::NotYet => (KhoPin::NotYet, None),
        Pin::NoRoot => (KhoPin::NoRoot, None),
        Pin::Ambiguous { .. } => (KhoPin::Ambiguous, None),
        Pin::Failed { .. } => (KhoPin::Failed, None),
        Pin::Pinned { handoff, .. } => (
            KhoPin::Pinned,
            Some(match handoff {
                Handoff::FirstBoot => KhoHandoff::FirstBoot,
                Handoff::Kept { .. } => KhoHandoff::Kept,
                Handoff::Missing { .. } => KhoHandoff::Missing,
            }),
        ),
    }
}

/// Replaces `{name}` with the PFN bound to `name`, in hex.
fn substitute(template: &str, refs: &Refs) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in '{template}'"))?;
        let name = &rest[open + 1..open + close];
        let pfn = refs
            .named_pfn(name)
            .ok_or_else(|| format!("'{name}' was never reported"))?;
        out.push_str(&format!("{pfn:#x}"));
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Evaluates `expect` against a run's report and the references it bound.
pub fn evaluate(expect: &Expect, report: &RunReport, refs: &Refs) -> Verdict {
    let mut f = Vec::new();
    if report.outcome != expect.outcome {
        f.push(format!(
            "outcome is {} ({}), expected {}",
            report.outcome.as_str(),
            report.detail,
            expect.outcome.as_str()
        ));
    }
    if let Some(d) = &expect.detail {
        match substitute(d, refs) {
            Ok(want) if want != report.detail => {
                f.push(format!("detail is '{}', expected '{want}'", report.detail))
            }
            Ok(_) => {}
            Err(e) => f.push(e),
        }
    }
    if let Some(d) = &expect.detail_contains {
        match substitute(d, refs) {
            Ok(want) if !report.detail.contains(&want) => f.push(format!(
                "detail '{}' does not contain '{want}'",
                report.detail
            )),
            Ok(_) => {}
            Err(e) => f.push(e),
        }
    }
    for want in &expect.log_contains {
        match substitute(want, refs) {
            Ok(want)
                if !report
                    .console
                    .iter()
                    .chain(&report.log)
                    .any(|l| l.contains(want.as_str())) =>
            {
                f.push(format!(
                    "no console line contains '{want}'{}",
                    match report.console_dropped {
                        0 => String::new(),
                        n => format!(" ({n} late lines were not kept)"),
                    }
                ))
            }
            Ok(_) => {}
            Err(e) => f.push(e),
        }
    }
    if let Some(signals) = &expect.signals {
        if signals.len() != report.signals.len() {
            f.push(format!(
                "{} signals arrived, expected {}",
                report.signals.len(),
                signals.len()
            ));
        }
        for (i, (want, got)) in signals.iter().zip(&report.signals).enumerate() {
            let code = signal_code(&want.code).unwrap_or(-1);
            if got.signo != SIGBUS || got.code != code {
                f.push(format!(
                    "signal {}: signo {} code {}, expected SIGBUS {}",
                    i + 1,
                    got.signo,
                    got.code,
                    want.code
                ));
            }
            match refs.vaddr(&want.page) {
                Some(v) if v == got.addr & !0xfff => {}
                Some(v) => f.push(format!(
                    "signal {}: si_addr {:#x}, expected {} at {v:#x}",
                    i + 1,
                    got.addr,
                    want.page
                )),
                None => f.push(format!("'{}' was never allocated", want.page)),
            }
        }
    }
    let last_info = |pfn: u64| -> Option<&PageInfo> {
        payloads_rev(report).find_map(|p| match p {
            Payload::PageInfo(i) if i.pfn == pfn => Some(i),
            _ => None,
        })
    };
    for page in &expect.hwpoison {
        match refs.named_pfn(page) {
            None => f.push(format!("'{page}' was never reported")),
            Some(pfn) => match last_info(pfn) {
                Some(i) if i.hwpoison => {}
                Some(_) => f.push(format!(
                    "{page} (PFN {pfn:#x}) is not KPF_HWPOISON in the guest"
                )),
                None => f.push(format!("no page-info step read {page}")),
            },
        }
    }
    for page in &expect.not_hwpoison {
        match refs.named_pfn(page) {
            None => f.push(format!("'{page}' was never reported")),
            Some(pfn) => match last_info(pfn) {
                Some(i) if !i.hwpoison => {}
                Some(_) => f.push(format!(
                    "{page} (PFN {pfn:#x}) is KPF_HWPOISON in the guest"
                )),
                None => f.push(format!("no page-info step read {page}")),
            },
        }
    }
    if let Some(kb) = expect.hardware_corrupted_kb {
        let got = payloads_rev(report).find_map(|p| match p {
            Payload::PageInfo(i) => Some(i.hardware_corrupted_kb),
            _ => None,
        });
        if got != Some(kb) {
            f.push(format!("HardwareCorrupted is {got:?} kB, expected {kb} kB"));
        }
    }
    for (page, want) in &expect.consumptions {
        match refs.named_pfn(page) {
            None => f.push(format!("'{page}' was never reported")),
            Some(pfn) => {
                let got = report
                    .ledger
                    .iter()
                    .find(|e| e.gpa == pfn * 4096)
                    .map_or(0, |e| e.consumptions);
                if got != *want {
                    f.push(format!("{page} was consumed {got} times, expected {want}"));
                }
            }
        }
    }
    for (index, want) in &expect.step_errors {
        let got = crate::steps::number(index)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| report.steps.get(i))
            .and_then(|s| s.error.clone());
        match got {
            Some(e) if e.contains(want.as_str()) => {}
            Some(e) => f.push(format!("step {index} failed with '{e}', expected '{want}'")),
            None => f.push(format!("step {index} did not fail, expected '{want}'")),
        }
    }
    // A step that fails unexpectedly fails the scenario: what it was to do
    // did not happen. Steps the end of the run cut short are not failures
    // of their own.
    for (i, s) in report.steps.iter().enumerate() {
        if let Some(e) = &s.error {
            if !s.cut_short && !expect.step_errors.contains_key(&(i + 1).to_string()) {
                f.push(format!("step {} ({}) failed: {e}", i + 1, s.step));
            }
        }
    }
    for (name, want) in &expect.sysctls {
        let got = payloads_rev(report).find_map(|p| match p {
            Payload::Sysctl(v) if &v.name == name => Some(&v.value),
            _ => None,
        });
        match got {
            Some(v) if v == want => {}
            Some(v) => f.push(format!("sysctl {name} is {v}, expected {want}")),
            None => f.push(format!("no sysctl step read {name}")),
        }
    }
    if let Some(min) = expect.min_consumptions {
        let total: u32 = report.ledger.iter().map(|e| e.consumptions).sum();
        if total < min {
            f.push(format!(
                "the guest consumed poisoned pages {total} times, expected at least {min}"
            ));
        }
    }
    for (&vcpu, &min) in &expect.consumptions_per_vcpu {
        let n = report
            .ras_events
            .iter()
            .filter(|e| matches!(e, RasEvent::Consumed { vcpu: v, .. } if *v == vcpu))
            .count();
        if n < min as usize {
            f.push(format!(
                "vCPU {vcpu} took {n} consumptions, expected at least {min}"
            ));
        }
    }
    check_ghes(expect, report, refs, &mut f);
    check_host(expect, report, refs, &mut f);
    if let Some(e) = &expect.einj {
        guest_tools::check_einj(e, report, refs, &mut f);
    }
    guest_tools::check_exec(&expect.exec, report, &mut f);
    if let Some(r) = &expect.rasdaemon {
        guest_tools::check_rasdaemon(r, report, refs, &mut f);
    }
    if let Some(k) = &expect.kho {
        check_kho(k, report, refs, &mut f);
    }
    if let Some(b) = &expect.boots {
        boots::check_boots(b, report, refs, &mut f);
    }
    Verdict {
        passed: f.is_empty(),
        failures: f,
        not_applicable: Vec::new(),
    }
}

/// The ledger's provenance and the host's reports.
fn check_host(expect: &Expect, report: &RunReport, refs: &Refs, f: &mut Vec<String>) {
    for (page, want) in &expect.ledger {
        let Some(pfn) = refs.named_pfn(page) else {
            f.push(format!("'{page}' was never reported"));
            continue;
        };
        let Some(e) = report.ledger.iter().find(|e| e.gpa == pfn * 4096) else {
            f.push(format!("{page} is not in the ledger"));
            continue;
        };
        if let Some(s) = want.source {
            if e.source != s {
                f.push(format!(
                    "{page}'s ledger source is {:?}, expected {s:?}",
                    e.source
                ));
            }
        }
        let told: Vec<String> = e.told.iter().map(|t| t.name()).collect();
        for t in &want.told {
            if !told.contains(t) {
                f.push(format!("{page}: the guest was told {told:?}, expected {t}"));
            }
        }
    }
    if let Some(want) = expect.host_reports {
        let got = report
            .ras_events
            .iter()
            .filter(|e| matches!(e, RasEvent::HostMemoryError { .. }))
            .count();
        if got != want as usize {
            f.push(format!(
                "rasvmm recorded {got} host memory-error reports, expected {want}"
            ));
        }
    }
}

/// The KHO expectations, over every view the run recorded.
fn check_kho(k: &ExpectKho, report: &RunReport, refs: &Refs, f: &mut Vec<String>) {
    let mut views: Vec<&KhoView> = report
        .steps
        .iter()
        .filter_map(|s| match &s.reply {
            Some(StepReply::Kho { kho }) => Some(&**kho),
            _ => None,
        })
        .collect();
    let mut kexecs = 0;
    for e in &report.ras_events {
        match e {
            RasEvent::GuestKexec { .. } => kexecs += 1,
            RasEvent::KhoScanned { view, .. } => views.push(view),
            _ => {}
        }
    }
    if let Some(n) = k.kexecs {
        if n != kexecs {
            f.push(format!("the guest kexec'd {kexecs} times, expected {n}"));
        }
    }
    if let Some(n) = k.views {
        if n != views.len() {
            f.push(format!(
                "{} KHO views were recorded, expected {n}",
                views.len()
            ));
        }
    }
    if let Some(last) = views.last() {
        let reasons: Vec<&str> = last.rejected.iter().map(|r| r.reason.as_str()).collect();
        for want in &k.rejected {
            if !reasons.iter().any(|r| r.contains(want.as_str())) {
                f.push(format!(
                    "the last KHO view rejected no root for '{want}' (it rejected: {reasons:?})"
                ));
            }
        }
        check_last_kho(k, last, refs, f);
    } else if !k.rejected.is_empty()
        || !k.rejected_entries.is_empty()
        || !k.types.is_empty()
        || k.min_rejected.is_some()
        || k.pin.is_some()
        || k.handoff.is_some()
    {
        f.push("no KHO view was recorded".into());
    }
    let want_pfns: Option<Result<Vec<u64>, String>> = k.pfns.as_ref().map(|names| {
        let mut v = names
            .iter()
            .map(|n| refs.pfn(&Target::Ref(n.clone())))
            .collect::<Result<Vec<u64>, String>>()?;
        v.sort_unstable();
        Ok(v)
    });
    for (i, v) in views.iter().enumerate() {
        let state = state_of(&v.hwpoison);
        if let Some(want) = k.state {
            if state != want {
                f.push(format!(
                    "KHO view {}: hwpoison is {}, expected {want:?}",
                    i + 1,
                    v.hwpoison.brief()
                ));
            }
        }
        if let Some(want) = k.verdict {
            if verdict_of(&v.comparison) != want {
                f.push(format!(
                    "KHO view {}: comparison is {}, expected {want:?}",
                    i + 1,
                    v.comparison.brief()
                ));
            }
        }
        match (&want_pfns, &v.hwpoison) {
            (Some(Err(e)), _) => f.push(e.clone()),
            (Some(Ok(want)), h @ Hwpoison::Valid { .. }) => {
                let got = h.pfns().unwrap_or_default();
                if &got != want {
                    f.push(format!(
                        "KHO view {}: the guest lists PFNs {}, expected {}",
                        i + 1,
                        crate::kho_observer::brief_list(&got),
                        crate::kho_observer::brief_list(want)
                    ));
                }
            }
            _ => {}
        }
    }
}

/// The expectations on the last KHO view: candidates rejected, entries
/// rejected, entry types, pin and handoff.
fn check_last_kho(k: &ExpectKho, last: &KhoView, refs: &Refs, f: &mut Vec<String>) {
    if let Some(min) = k.min_rejected {
        if last.rejected_total < min {
            f.push(format!(
                "the last KHO view rejected {} roots, expected at least {min}",
                last.rejected_total
            ));
        }
    }
    let (entries, rejected) = match &last.hwpoison {
        Hwpoison::Valid {
            entries, rejected, ..
        } => (&entries[..], &rejected[..]),
        _ => (&[][..], &[][..]),
    };
    let problems: Vec<String> = rejected.iter().map(|r| r.problem.to_string()).collect();
    for want in &k.rejected_entries {
        if !problems.iter().any(|p| p.contains(want.as_str())) {
            f.push(format!(
                "the last KHO view rejected no entry for '{want}' (it rejected: {problems:?})"
            ));
        }
    }
    for (name, want) in &k.types {
        match refs.pfn(&Target::Ref(name.clone())) {
            Err(e) => f.push(e),
            Ok(pfn) => match entries.iter().find(|e| e.pfn == pfn) {
                Some(e) if e.kind == *want => {}
                Some(e) => f.push(format!(
                    "the last KHO view lists {name} ({pfn:#x}) as {:?}, expected {want:?}",
                    e.kind
                )),
                None => f.push(format!("the last KHO view does not list {name} ({pfn:#x})")),
            },
        }
    }
    let (pin, handoff) = pin_of(&last.pin);
    if let Some(want) = k.pin {
        if pin != want {
            f.push(format!(
                "the last KHO view's pin is {:?}, expected {want:?}",
                last.pin
            ));
        }
    }
    if let Some(want) = k.handoff {
        if handoff != Some(want) {
            f.push(format!(
                "the last KHO view's handoff is {handoff:?} ({:?}), expected {want:?}",
                last.pin
            ));
        }
    }
}

/// The GHES expectations: the guest's decode, soft offlines, acknowledgements.
fn check_ghes(expect: &Expect, report: &RunReport, refs: &Refs, f: &mut Vec<String>) {
    let decoded: Vec<(u64, bool)> = report
        .ras_events
        .iter()
        .filter_map(|e| match e {
            RasEvent::GuestDecoded {
                physical_addr,
                matches_report,
            } => Some((*physical_addr, *matches_report)),
            _ => None,
        })
        .collect();
    for page in &expect.cper_decoded {
        match refs.gpa(&Target::Ref(page.clone())) {
            Err(e) => f.push(e),
            Ok(gpa) => match decoded.iter().find(|(a, _)| *a == gpa) {
                Some((_, true)) => {}
                Some((_, false)) => f.push(format!(
                    "the guest decoded {gpa:#x} ({page}) but rasvmm reported no record there"
                )),
                None => {
                    let seen: Vec<String> =
                        decoded.iter().map(|(a, _)| format!("{a:#x}")).collect();
                    f.push(format!(
                        "the guest never decoded a memory error at {gpa:#x} ({page}); it decoded [{}]",
                        seen.join(", ")
                    ))
                }
            },
        }
    }
    for (a, ok) in &decoded {
        if !ok {
            f.push(format!(
                "the guest decoded {a:#x}, which rasvmm never reported"
            ));
        }
    }
    for page in &expect.soft_offlined {
        let Some(index) = page.strip_prefix("page").and_then(crate::steps::number) else {
            f.push(format!("'{page}' is not a page holder"));
            continue;
        };
        let Some(pfn) = refs.named_pfn(page) else {
            f.push(format!("'{page}' was never allocated"));
            continue;
        };
        let touch: Option<&TouchResult> = payloads_rev(report).find_map(|p| match p {
            Payload::Touch(t) if u64::from(t.page) == index => Some(t),
            _ => None,
        });
        match touch {
            None => f.push(format!("no touch-page step touched {page}")),
            Some(TouchResult {
                signal: Some(s), ..
            }) => f.push(format!("touching {page} raised a signal: {s:?}")),
            Some(t) if !t.intact => f.push(format!("{page}'s data did not survive")),
            Some(t) if t.pfn == Some(pfn) => f.push(format!(
                "{page} is still at PFN {pfn:#x}: it was not migrated"
            )),
            Some(_) => {}
        }
    }
    let counts = [
        ("acknowledged", &expect.ghes_acked),
        ("written", &expect.ghes_written),
    ];
    for (what, map) in counts {
        for (source, want) in map {
            let got = report
                .ghes
                .iter()
                .find(|s| s.source.as_str() == source)
                .map(|s| {
                    if what == "written" {
                        s.stats.written
                    } else {
                        s.stats.acked
                    }
                });
            match got {
                Some(n) if n == *want => {}
                Some(n) => f.push(format!(
                    "the {source} source had {n} records {what}, expected {want}"
                )),
                None => f.push(format!("no GHES source '{source}'")),
            }
        }
    }
}

mod boots;
mod guest_tools;

#[cfg(test)]
mod tests;
