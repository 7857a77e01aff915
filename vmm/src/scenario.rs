//! Scenario files: a guest, the steps to perform, and the verdict expected.
//!
//! ```toml
//! name = "sticky-user-page-amd"
//! description = "A poisoned user page: the touch raises SIGBUS AR, the guest runs on."
//!
//! [guest]
//! cpu = "amd"          # CPU profile
//! vcpus = 1
//! memory_mib = 256
//! append = ""          # added to the kernel command line
//! timeout_s = 60
//!
//! steps = ["alloc-page", "poison:page0", "touch-page:0", "page-info:page0", "poweroff"]
//!
//! [expect]
//! outcome = "poweroff"
//! signals = [{ code = "BUS_MCEERR_AR", page = "page0" }]
//! hwpoison = ["page0"]
//! hardware_corrupted_kb = 4
//! consumptions = { page0 = 1 }
//! ```
//!
//! `detail` and `detail_contains` may name references: `{slab0}` stands for
//! that PFN in hex (`0x141`), as Linux prints it. The verdict is computed by
//! [`evaluate`] from the run's report, so it is the same whether the guest
//! ran directly or in the lab host.

use std::collections::BTreeMap;
use std::path::Path;

use guest_agent::{BUS_MCEERR_AO, BUS_MCEERR_AR};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::outcome::OutcomeKind;
use crate::report::RunReport;
use crate::steps::Refs;
use crate::vcpu::RasEvent;

/// Largest scenario file read.
const MAX_FILE: u64 = 1 << 20;
/// SIGBUS.
const SIGBUS: i32 = 7;

/// A scenario that cannot be used.
#[derive(Debug, Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("Cannot read scenario '{0}'")]
    Read(String, #[source] std::io::Error),
    /// The file is larger than any scenario.
    #[error("Scenario '{0}' is larger than 1 MiB")]
    TooLarge(String),
    /// The file is not a valid scenario.
    #[error("Bad scenario '{0}': {1}")]
    Parse(String, String),
}

/// Guest settings; unset ones keep rasvmm's defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    /// CPU profile.
    pub cpu: Option<String>,
    /// vCPUs.
    pub vcpus: Option<u64>,
    /// Guest RAM, MiB.
    pub memory_mib: Option<u64>,
    /// Appended to the kernel command line.
    pub append: Option<String>,
    /// Deadline in seconds.
    pub timeout_s: Option<f64>,
    /// How consumed poison is reported: mce, ghes-nmi, ghes-gsiv, ghes-polled.
    pub poison_report: Option<String>,
}

/// A signal the guest's page holder must have received.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSignal {
    /// `BUS_MCEERR_AR` or `BUS_MCEERR_AO`.
    pub code: String,
    /// The page holder (`page0`); si_addr must be its page.
    pub page: String,
}

/// What the KHO observer must have read (every view: each `kho-scan` step
/// and the scan after each kexec).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectKho {
    /// Guest kexecs.
    pub kexecs: Option<u32>,
    /// Views recorded.
    pub views: Option<usize>,
    /// The hwpoison subtree's state in every view: valid, absent, invalid.
    pub state: Option<String>,
    /// Every view's comparison with the ledger: agree, differ, unknown.
    pub verdict: Option<String>,
    /// Every valid view lists exactly these pages.
    pub pfns: Option<Vec<String>>,
    /// The last view rejected roots for each of these reasons (substrings).
    #[serde(default)]
    pub rejected: Vec<String>,
}

/// The verdict expected.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// How the run must end.
    pub outcome: OutcomeKind,
    /// The outcome's detail exactly (for a panic: the panic line).
    pub detail: Option<String>,
    /// A substring of the detail.
    pub detail_contains: Option<String>,
    /// Substrings that must appear in the captured log.
    #[serde(default)]
    pub log_contains: Vec<String>,
    /// The exact signals, in order (empty: none may arrive).
    pub signals: Option<Vec<ExpectSignal>>,
    /// Pages the guest must report as KPF_HWPOISON (by their last page-info).
    #[serde(default)]
    pub hwpoison: Vec<String>,
    /// HardwareCorrupted in the last page-info reply.
    pub hardware_corrupted_kb: Option<u64>,
    /// Consumptions rasvmm counted per page (0: never touched again).
    #[serde(default)]
    pub consumptions: BTreeMap<String, u32>,
    /// Steps (1-based) that must fail, with a substring of their error.
    #[serde(default)]
    pub step_errors: BTreeMap<String, String>,
    /// Pages (references) reported through GHES whose address the guest's
    /// own CPER decode printed ("[Hardware Error]: physical_address:").
    #[serde(default)]
    pub cper_decoded: Vec<String>,
    /// Page holders whose page was soft-offlined: the last touch found the
    /// data intact at a different PFN, without a signal.
    #[serde(default)]
    pub soft_offlined: Vec<String>,
    /// Records each GHES source must have had acknowledged (`nmi = 10`).
    #[serde(default)]
    pub ghes_acked: BTreeMap<String, u64>,
    /// Records each GHES source must have had written into its block.
    #[serde(default)]
    pub ghes_written: BTreeMap<String, u64>,
    /// What the KHO observer read.
    pub kho: Option<ExpectKho>,
    /// Consumptions rasvmm counted over all pages, at least.
    pub min_consumptions: Option<u32>,
    /// Consumptions each vCPU must have taken, at least (`0 = 20`): a
    /// burst must really run across the vCPUs.
    #[serde(default)]
    pub consumptions_per_vcpu: BTreeMap<u8, u32>,
    /// Sysctls' values as the last `sysctl` step that read each saw.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
}

/// A scenario.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in reports.
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// Guest settings.
    #[serde(default)]
    pub guest: Guest,
    /// Steps, in the `--step` syntax.
    pub steps: Vec<String>,
    /// The verdict expected.
    pub expect: Expect,
    /// The verdict expected instead when the guest cannot recover from
    /// memory errors because it lacks SER_P (an Intel profile on an SVM
    /// host, where KVM drops it; AMD guests do not need SER_P).
    pub expect_without_ser: Option<Expect>,
}

impl Scenario {
    /// The expectation that applies to a guest that can (`recoverable`) or
    /// cannot grade memory errors as recoverable.
    pub fn expectation(&self, recoverable: bool) -> &Expect {
        match &self.expect_without_ser {
            Some(e) if !recoverable => e,
            _ => &self.expect,
        }
    }

    /// Reads and parses a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, Error> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| Error::Read(name.clone(), e))?;
        if meta.len() > MAX_FILE {
            return Err(Error::TooLarge(name));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read(name.clone(), e))?;
        Self::parse(&text).map_err(|e| Error::Parse(name, e))
    }

    /// Parses scenario text; the error is one line.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    format!("line {line}: {msg}")
                }
                None => msg,
            }
        })?;
        for (i, st) in s.steps.iter().enumerate() {
            crate::steps::parse(st).map_err(|e| format!("step {}: {e}", i + 1))?;
        }
        if let Some(p) = &s.guest.poison_report {
            crate::config::PoisonReport::parse(p).map_err(|e| e.to_string())?;
        }
        for e in std::iter::once(&s.expect).chain(&s.expect_without_ser) {
            for sig in e.signals.iter().flatten() {
                signal_code(&sig.code)?;
            }
        }
        Ok(s)
    }
}

fn signal_code(name: &str) -> Result<i32, String> {
    match name {
        "BUS_MCEERR_AR" => Ok(BUS_MCEERR_AR),
        "BUS_MCEERR_AO" => Ok(BUS_MCEERR_AO),
        other => Err(format!(
            "unknown signal code '{other}' (BUS_MCEERR_AR, BUS_MCEERR_AO)"
        )),
    }
}

/// Whether a run met its expectation, and how not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Every expectation held.
    pub passed: bool,
    /// The ones that did not.
    pub failures: Vec<String>,
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
            Ok(want) if !report.log.iter().any(|l| l.contains(want.as_str())) => {
                f.push(format!("no captured log line contains '{want}'"))
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
    let last_info = |pfn: u64| {
        report
            .steps
            .iter()
            .rev()
            .filter_map(|s| s.reply.as_ref())
            .map(|r| &r["page-info"])
            .find(|i| i["pfn"].as_u64() == Some(pfn))
            .cloned()
    };
    for page in &expect.hwpoison {
        match refs.named_pfn(page) {
            None => f.push(format!("'{page}' was never reported")),
            Some(pfn) => match last_info(pfn) {
                Some(i) if i["hwpoison"] == true => {}
                Some(_) => f.push(format!(
                    "{page} (PFN {pfn:#x}) is not KPF_HWPOISON in the guest"
                )),
                None => f.push(format!("no page-info step read {page}")),
            },
        }
    }
    if let Some(kb) = expect.hardware_corrupted_kb {
        let got = report
            .steps
            .iter()
            .rev()
            .filter_map(|s| s.reply.as_ref())
            .find_map(|r| r["page-info"]["hardware_corrupted_kb"].as_u64());
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
        let got = index
            .parse::<usize>()
            .ok()
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
    // did not happen.
    for (i, s) in report.steps.iter().enumerate() {
        if let Some(e) = &s.error {
            // Steps the end of the run cut short are not failures of their own.
            let cut_short = e == &crate::vm::CallError::Ended.to_string();
            if !cut_short && !expect.step_errors.contains_key(&(i + 1).to_string()) {
                f.push(format!("step {} ({}) failed: {e}", i + 1, s.step));
            }
        }
    }
    for (name, want) in &expect.sysctls {
        let got = report
            .steps
            .iter()
            .rev()
            .filter_map(|s| s.reply.as_ref())
            .find(|r| r["sysctl"]["name"] == name.as_str())
            .and_then(|r| r["sysctl"]["value"].as_str().map(str::to_string));
        match got {
            Some(v) if &v == want => {}
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
    if let Some(k) = &expect.kho {
        check_kho(k, report, refs, &mut f);
    }
    Verdict {
        passed: f.is_empty(),
        failures: f,
    }
}

/// The KHO expectations, over every view the run recorded.
fn check_kho(k: &ExpectKho, report: &RunReport, refs: &Refs, f: &mut Vec<String>) {
    use crate::vcpu::RasEvent;
    let mut views: Vec<serde_json::Value> = report
        .steps
        .iter()
        .filter_map(|s| s.reply.as_ref())
        .filter(|r| !r["kho"].is_null())
        .map(|r| r["kho"].clone())
        .collect();
    let mut kexecs = 0;
    for e in &report.ras_events {
        match e {
            RasEvent::GuestKexec { .. } => kexecs += 1,
            RasEvent::KhoScanned { view, .. } => {
                views.push(serde_json::to_value(view).unwrap_or_default())
            }
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
        let reasons: Vec<&str> = last["rejected"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["reason"].as_str()).collect())
            .unwrap_or_default();
        for want in &k.rejected {
            if !reasons.iter().any(|r| r.contains(want.as_str())) {
                f.push(format!(
                    "the last KHO view rejected no root for '{want}' (it rejected: {reasons:?})"
                ));
            }
        }
    } else if !k.rejected.is_empty() {
        f.push("no KHO view was recorded".into());
    }
    let want_pfns: Option<Result<Vec<u64>, String>> = k.pfns.as_ref().map(|names| {
        let mut v = names
            .iter()
            .map(|n| refs.pfn(&crate::steps::Target::Ref(n.clone())))
            .collect::<Result<Vec<u64>, String>>()?;
        v.sort_unstable();
        Ok(v)
    });
    for (i, v) in views.iter().enumerate() {
        let state = v["hwpoison"]["state"].as_str().unwrap_or("?");
        if let Some(want) = &k.state {
            if state != want {
                f.push(format!(
                    "KHO view {}: hwpoison is {state} ({}), expected {want}",
                    i + 1,
                    v["hwpoison"]["reason"]
                ));
            }
        }
        if let Some(want) = &k.verdict {
            let got = v["comparison"]["verdict"].as_str().unwrap_or("?");
            if got != want {
                f.push(format!(
                    "KHO view {}: comparison is {}, expected {want}",
                    i + 1,
                    v["comparison"]
                ));
            }
        }
        match &want_pfns {
            Some(Err(e)) => f.push(e.clone()),
            Some(Ok(want)) if state == "valid" => {
                let got: Vec<u64> = v["hwpoison"]["pfns"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|p| p.as_u64()).collect())
                    .unwrap_or_default();
                if &got != want {
                    f.push(format!(
                        "KHO view {}: the guest lists PFNs {got:x?}, expected {want:x?}",
                        i + 1
                    ));
                }
            }
            _ => {}
        }
    }
}

/// The GHES expectations: the guest's decode, soft offlines, acknowledgements.
fn check_ghes(expect: &Expect, report: &RunReport, refs: &Refs, f: &mut Vec<String>) {
    use crate::vcpu::RasEvent;
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
        match refs.gpa(&crate::steps::Target::Ref(page.clone())) {
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
        let Some(index) = page
            .strip_prefix("page")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            f.push(format!("'{page}' is not a page holder"));
            continue;
        };
        let Some(pfn) = refs.named_pfn(page) else {
            f.push(format!("'{page}' was never allocated"));
            continue;
        };
        let touch = report
            .steps
            .iter()
            .rev()
            .filter_map(|s| s.reply.as_ref())
            .map(|r| &r["touch"])
            .find(|t| t["page"].as_u64() == Some(index));
        match touch {
            None => f.push(format!("no touch-page step touched {page}")),
            Some(t) if !t["signal"].is_null() => {
                f.push(format!("touching {page} raised a signal: {}", t["signal"]))
            }
            Some(t) if t["intact"] != true => f.push(format!("{page}'s data did not survive")),
            Some(t) if t["pfn"].as_u64() == Some(pfn) => f.push(format!(
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

#[cfg(test)]
mod tests {
    use guest_agent::{Command, KernelPageKind, PageRecord, Payload, SignalReport};
    use ras::ledger::{Entry, Source};

    use super::*;
    use crate::outcome::Outcome;
    use crate::report::StepRecord;

    const FILE: &str = r#"
name = "sticky-user-page"
steps = ["alloc-page", "poison:page0", "touch-page:0", "page-info:page0", "poweroff"]
[guest]
cpu = "amd"
[expect]
outcome = "poweroff"
signals = [{ code = "BUS_MCEERR_AR", page = "page0" }]
hwpoison = ["page0"]
hardware_corrupted_kb = 4
consumptions = { page0 = 1 }
"#;

    fn refs() -> Refs {
        let mut r = Refs::default();
        let page = PageRecord {
            page: 0,
            pid: 40,
            vaddr: 0x7f00_0000_0000,
            pfn: 0x1234,
            cpu: 0,
        };
        r.learn(&Command::AllocPage, &Payload::Page(page));
        r.learn(
            &Command::KernelPages {
                kind: KernelPageKind::Slab,
                count: 1,
            },
            &Payload::KernelPages(vec![0x141]),
        );
        r
    }

    fn report(kind: OutcomeKind, detail: &str) -> RunReport {
        let mut r = RunReport::new(
            Outcome {
                kind,
                detail: detail.into(),
                log: vec!["mce: [Hardware Error]: Machine check events logged".into()],
            },
            "amd",
            1,
            256,
        );
        r.signals.push(SignalReport {
            page: 0,
            pid: 40,
            signo: 7,
            code: BUS_MCEERR_AR,
            addr: 0x7f00_0000_0000,
            addr_lsb: 12,
        });
        r.steps.push(StepRecord {
            step: "page-info:page0".into(),
            reply: Some(serde_json::json!({"page-info": {"pfn": 0x1234, "hwpoison": true, "hardware_corrupted_kb": 4, "kpageflags": 0}})),
            error: None,
            at_ms: 1,
        });
        r.ledger.push(Entry {
            gpa: 0x1234 * 4096,
            source: Source::Injected,
            poisoned_at_ms: 0,
            consumptions: 1,
        });
        r
    }

    #[test]
    fn parses_and_passes() {
        let s = Scenario::parse(FILE).unwrap();
        assert_eq!(s.guest.cpu.as_deref(), Some("amd"));
        let v = evaluate(&s.expect, &report(OutcomeKind::Poweroff, ""), &refs());
        assert_eq!(
            v,
            Verdict {
                passed: true,
                failures: vec![]
            }
        );
    }

    #[test]
    fn every_mismatch_is_named() {
        let s = Scenario::parse(FILE).unwrap();
        let mut r = report(OutcomeKind::Panic, "Kernel panic - not syncing: x");
        r.signals[0].code = BUS_MCEERR_AO;
        r.ledger[0].consumptions = 3;
        let v = evaluate(&s.expect, &r, &refs());
        assert!(!v.passed);
        assert_eq!(v.failures.len(), 3, "{v:?}");
        assert!(v.failures[0].starts_with("outcome is panic"));
        assert!(v.failures[1].contains("expected SIGBUS BUS_MCEERR_AR"));
        assert_eq!(v.failures[2], "page0 was consumed 3 times, expected 1");
    }

    #[test]
    fn unexpected_step_errors_fail_but_cut_short_steps_do_not() {
        let s = Scenario::parse(FILE).unwrap();
        let mut r = report(OutcomeKind::Poweroff, "");
        r.steps.push(StepRecord {
            step: "exec:true".into(),
            reply: None,
            error: Some(crate::vm::CallError::Ended.to_string()),
            at_ms: 2,
        });
        assert!(evaluate(&s.expect, &r, &refs()).passed);
        r.steps.push(StepRecord {
            step: "poison:page0".into(),
            reply: None,
            error: Some("Cannot poison guest page 0x1000: busy".into()),
            at_ms: 3,
        });
        let v = evaluate(&s.expect, &r, &refs());
        assert_eq!(
            v.failures,
            vec!["step 3 (poison:page0) failed: Cannot poison guest page 0x1000: busy"]
        );
    }

    #[test]
    fn kho_views_are_checked() {
        let text = r#"
name = "kho"
steps = ["kho-scan"]
[expect]
outcome = "poweroff"
[expect.kho]
views = 1
state = "valid"
verdict = "agree"
pfns = ["page0"]
rejected = ["bad magic"]
"#;
        let s = Scenario::parse(text).unwrap();
        let mut r = report(OutcomeKind::Poweroff, "");
        r.steps.push(StepRecord {
            step: "kho-scan".into(),
            reply: Some(serde_json::json!({"kho": {
                "hwpoison": {"state": "valid", "pfns": [0x1234]},
                "comparison": {"verdict": "agree"},
                "rejected": [{"root": 4096, "reason": "hwpoison blob is invalid: bad magic"}]
            }})),
            error: None,
            at_ms: 3,
        });
        assert!(evaluate(&s.expect, &r, &refs()).passed);
        r.steps[1].reply = Some(serde_json::json!({"kho": {
            "hwpoison": {"state": "valid", "pfns": [0x99]},
            "comparison": {"verdict": "differ"},
            "rejected": []
        }}));
        let v = evaluate(&s.expect, &r, &refs());
        assert_eq!(v.failures.len(), 3, "{v:?}");
    }

    #[test]
    fn consumptions_are_counted_per_vcpu() {
        let text = r#"
name = "burst"
steps = []
[expect]
outcome = "poweroff"
consumptions_per_vcpu = { 0 = 1, 1 = 2 }
"#;
        let s = Scenario::parse(text).unwrap();
        let mut r = report(OutcomeKind::Poweroff, "");
        r.signals.clear();
        let consumed = |vcpu| RasEvent::Consumed {
            vcpu,
            gpa: 0x1234 * 4096,
            error: ras::mce::MemoryError::Srar,
            consumptions: 1,
            at_ms: 5,
            result: None,
            ghes: None,
        };
        r.ras_events = vec![consumed(0), consumed(1)];
        assert_eq!(
            evaluate(&s.expect, &r, &refs()).failures,
            vec!["vCPU 1 took 1 consumptions, expected at least 2"]
        );
        r.ras_events.push(consumed(1));
        assert!(evaluate(&s.expect, &r, &refs()).passed);
    }

    #[test]
    fn detail_names_pfns_as_linux_prints_them() {
        let text = r#"
name = "kernel-page"
steps = ["kernel-pages:slab:1", "inject:srao:slab0"]
[expect]
outcome = "panic"
detail = "Kernel panic - not syncing: Memory failure: {slab0}: unrecoverable page"
"#;
        let s = Scenario::parse(text).unwrap();
        let r = report(
            OutcomeKind::Panic,
            "Kernel panic - not syncing: Memory failure: 0x141: unrecoverable page",
        );
        let mut e = s.expect.clone();
        e.signals = None;
        assert!(evaluate(&e, &r, &refs()).passed);
        e.detail = Some("{nothing}".into());
        assert_eq!(
            evaluate(&e, &r, &refs()).failures,
            vec!["'nothing' was never reported"]
        );
    }

    #[test]
    fn expectation_follows_ser() {
        let text = r#"
name = "x"
steps = []
[expect]
outcome = "poweroff"
[expect_without_ser]
outcome = "panic"
"#;
        let s = Scenario::parse(text).unwrap();
        assert_eq!(s.expectation(true).outcome, OutcomeKind::Poweroff);
        assert_eq!(s.expectation(false).outcome, OutcomeKind::Panic);
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        for (text, want) in [
            ("name = 1", "line 1"),
            ("name = \"x\"\nsteps = [\"reboot\"]\n[expect]\noutcome = \"poweroff\"", "step 1: Bad step 'reboot'"),
            ("name = \"x\"\nsteps = []\n[expect]\noutcome = \"crashed\"", "unknown variant"),
            ("name = \"x\"\nsteps = []\nfrobnicate = 1\n[expect]\noutcome = \"panic\"", "unknown field"),
            (
                "name = \"x\"\nsteps = []\n[expect]\noutcome = \"panic\"\nsignals = [{code = \"SEGV\", page = \"page0\"}]",
                "unknown signal code",
            ),
        ] {
            let e = Scenario::parse(text).unwrap_err();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains('\n'), "{e:?}");
        }
    }
}
