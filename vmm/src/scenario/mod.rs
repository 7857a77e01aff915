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
//! the verdict module (`verdict::evaluate`) from the run's typed report, so
//! it is the same whether the guest ran directly or in the lab host.

use std::collections::BTreeMap;
use std::path::Path;

use guest_agent::{KernelFeature, BUS_MCEERR_AO, BUS_MCEERR_AR};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::outcome::OutcomeKind;

mod guest_tools;
pub use guest_tools::{
    ExpectEinj, ExpectExec, ExpectMcEvent, ExpectMceRecord, ExpectMemoryFailure, ExpectRasdaemon,
};

/// Largest scenario file read.
const MAX_FILE: u64 = 1 << 20;

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
    /// How consumed poison is reported: mce (x86_64) or sea (aarch64), or
    /// ghes-<source>.
    pub poison_report: Option<String>,
    /// Firmware tables: acpi or dt.
    pub tables: Option<String>,
    /// Host memory failures reported early or late (`--host-mce-kill`).
    pub host_mce_kill: Option<String>,
    /// What a guest reboot does: exit or restart.
    pub on_reboot: Option<String>,
    /// With restart: poisoned pages stay bad across a reset.
    pub keep_poison_on_reset: Option<bool>,
    /// The guest image the run needs (the lab passes its initramfs;
    /// run directly, pass it with `--initramfs`).
    pub image: Option<GuestImage>,
}

/// A guest image (initramfs) of scripts/build-images.sh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestImage {
    /// busybox, the agent and its init.
    Default,
    /// The same with Debian's rasdaemon, started by init before the agent
    /// says hello (docs/rasdaemon.md).
    Rasdaemon,
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
    /// The hwpoison subtree's state in every view.
    pub state: Option<KhoState>,
    /// Every view's comparison with the ledger.
    pub verdict: Option<KhoVerdict>,
    /// Every valid view lists exactly these pages.
    pub pfns: Option<Vec<String>>,
    /// The last view rejected roots for each of these reasons (substrings).
    #[serde(default)]
    pub rejected: Vec<String>,
    /// The last view rejected at least this many candidate roots (all
    /// counted, not only the ones listed in detail).
    pub min_rejected: Option<u32>,
    /// The last view's list rejected entries for each of these problems
    /// (substrings: "invalid type", "physical address wraps", "duplicate
    /// PFN", "outside guest RAM").
    #[serde(default)]
    pub rejected_entries: Vec<String>,
    /// Pages (references) the last valid view lists, each with this type.
    #[serde(default)]
    pub types: BTreeMap<String, ras::kho::EntryType>,
    /// How the last view's root was pinned.
    pub pin: Option<KhoPin>,
    /// The last view's handoff check (pinned views only).
    pub handoff: Option<KhoHandoff>,
}

/// How a KHO view's root was pinned, as an expectation names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KhoPin {
    /// No agent hello yet.
    NotYet,
    /// No KHO root in guest RAM at the hello.
    NoRoot,
    /// The running kernel's root.
    Pinned,
    /// Several new roots qualified.
    Ambiguous,
    /// None qualified.
    Failed,
}

/// A pinned view's handoff check, as an expectation names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KhoHandoff {
    /// No earlier root was pinned.
    FirstBoot,
    /// The previous kernel's root is still there.
    Kept,
    /// It is gone or changed.
    Missing,
}

/// A KHO view's hwpoison subtree, as an expectation names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KhoState {
    /// No subtree (an unpatched kernel, or kho=off).
    Absent,
    /// A list that validated, complete (INCOMPLETE clear).
    Valid,
    /// A list that validated, with the INCOMPLETE flag set.
    Incomplete,
    /// A malformed subtree.
    Invalid,
    /// No root pinned (no hello yet, or the pin was ambiguous or failed).
    Unpinned,
}

/// A KHO view's comparison with the ledger, as an expectation names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KhoVerdict {
    /// The same pages.
    Agree,
    /// They differ (or an entry cannot be placed in guest RAM).
    Differ,
    /// The list says it is incomplete.
    Incomplete,
    /// No valid list to compare.
    Unknown,
}

/// What one boot must have been (`[[expect.boots]]`, one table per boot).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectBoot {
    /// How it ended: `reset`, `panic` (a panic it rebooted from, or the
    /// run's), or the run's outcome for the last boot (`poweroff`, ...).
    pub end: Option<String>,
    /// A substring of the panic line or the outcome's detail (`{ref}` is
    /// that PFN in hex).
    pub detail_contains: Option<String>,
    /// Its agent said hello.
    pub agent: Option<bool>,
    /// Pages (references) its reset replaced with fresh zeroed memory.
    #[serde(default)]
    pub remapped: Vec<String>,
    /// Pages its reset left bad (`keep_poison_on_reset`).
    #[serde(default)]
    pub kept: Vec<String>,
    /// Pages the guest consumed (accessed while poisoned) during it.
    #[serde(default)]
    pub consumed: Vec<String>,
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
    /// Pages whose last page-info must not show KPF_HWPOISON.
    #[serde(default)]
    pub not_hwpoison: Vec<String>,
    /// Every boot of the run, in order (with `on_reboot = "restart"`): as
    /// many tables as boots.
    pub boots: Option<Vec<ExpectBoot>>,
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
    /// Ledger entries of pages (references): where the page's badness came
    /// from and what the guest was told.
    #[serde(default)]
    pub ledger: BTreeMap<String, ExpectLedger>,
    /// Host memory-error reports rasvmm recorded (early and at a vCPU).
    pub host_reports: Option<u32>,
    /// The EINJ requests the guest made, in order, with rasvmm's answers
    /// (none: any).
    pub einj: Option<Vec<ExpectEinj>>,
    /// `exec` steps (1-based) and what they must have returned.
    #[serde(default)]
    pub exec: BTreeMap<String, ExpectExec>,
    /// What rasdaemon must have recorded.
    pub rasdaemon: Option<ExpectRasdaemon>,
}

/// A page's ledger entry, as an expectation names it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectLedger {
    /// Where it came from (`host`, `injected`, `reported`, `guest`,
    /// `guest-einj`).
    pub source: Option<ras::ledger::Source>,
    /// Reports the guest must have been given, by name (`srao`, `srar`,
    /// `sea`, `unrecoverable`, `ghes-<source>-<severity>`).
    #[serde(default)]
    pub told: Vec<String>,
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
    /// What the guest kernel must offer (`requires = ["kho-hwpoison"]`):
    /// on a kernel that lacks one, as its agent reports at hello, the steps
    /// do not run and the verdict is `n/a`, naming what is missing.
    #[serde(default)]
    pub requires: Vec<KernelFeature>,
    /// The verdict expected instead on a guest kernel that lacks a feature
    /// (`[expect_without.panic-sysctl]`): where kernels differ, and how.
    #[serde(default)]
    pub expect_without: BTreeMap<KernelFeature, Expect>,
}

impl Scenario {
    /// The expectation that applies to a guest that can (`recoverable`) or
    /// cannot grade memory errors as recoverable, whose kernel offers
    /// `features` (`None`: its agent never said): `expect_without_ser`,
    /// else the first `expect_without` whose feature the kernel lacks, else
    /// `expect`.
    pub fn expectation(&self, recoverable: bool, features: Option<&[KernelFeature]>) -> &Expect {
        if let (Some(e), false) = (&self.expect_without_ser, recoverable) {
            return e;
        }
        let lacks = |f: &KernelFeature| features.is_some_and(|have| !have.contains(f));
        self.expect_without
            .iter()
            .find(|(f, _)| lacks(f))
            .map_or(&self.expect, |(_, e)| e)
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
        let mut steps = Vec::with_capacity(s.steps.len());
        for (i, st) in s.steps.iter().enumerate() {
            steps.push(crate::steps::parse(st).map_err(|e| format!("step {}: {e}", i + 1))?);
        }
        if let Some(t) = s.guest.timeout_s {
            crate::config::parse_timeout(t).map_err(|e| format!("guest.timeout_s: {e}"))?;
        }
        if let Some(p) = &s.guest.poison_report {
            crate::config::PoisonReport::parse(p).map_err(|e| e.to_string())?;
        }
        if let Some(t) = &s.guest.tables {
            crate::config::BootTables::parse(t).map_err(|e| e.to_string())?;
        }
        if let Some(r) = &s.guest.on_reboot {
            crate::config::OnReboot::parse(r).map_err(|e| e.to_string())?;
        }
        for f in s.expect_without.keys() {
            if s.requires.contains(f) {
                return Err(format!(
                    "expect_without.{} can never apply: the scenario requires {0}",
                    f.name()
                ));
            }
        }
        let all = std::iter::once(&s.expect)
            .chain(&s.expect_without_ser)
            .chain(s.expect_without.values());
        for e in all {
            for sig in e.signals.iter().flatten() {
                signal_code(&sig.code)?;
            }
            for index in e.exec.keys() {
                guest_tools::check_exec_key(index, &steps)?;
            }
            for (i, b) in e.boots.iter().flatten().enumerate() {
                match b.end.as_deref() {
                    None | Some("reset" | "panic") => {}
                    Some(k) if OutcomeKind::parse(k).is_some() => {}
                    Some(k) => {
                        return Err(format!(
                            "boot {}: unknown end '{k}' (reset, panic, or an outcome)",
                            i + 1
                        ))
                    }
                }
            }
        }
        Ok(s)
    }
}

/// The si_code a scenario names.
pub(crate) fn signal_code(name: &str) -> Result<i32, String> {
    match name {
        "BUS_MCEERR_AR" => Ok(BUS_MCEERR_AR),
        "BUS_MCEERR_AO" => Ok(BUS_MCEERR_AO),
        other => Err(format!(
            "unknown signal code '{other}' (BUS_MCEERR_AR, BUS_MCEERR_AO)"
        )),
    }
}

#[cfg(test)]
mod tests;
