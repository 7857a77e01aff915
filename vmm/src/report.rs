//! The record of a run: printed for humans and written as JSON for CI.

use guest_agent::{KernelFeature, Payload, SignalReport};
use ras::ledger::{Entry, PageFate};
use serde::{Deserialize, Serialize};

use crate::kho_observer::corrupt::KhoCorrupted;
use crate::kho_observer::KhoView;

use crate::event::RasEvent;
use crate::outcome::{Outcome, OutcomeKind};

/// What a step that succeeded returned, kept typed for the verdict and
/// written as the agent's payload (`{"page-info": {...}}`) or as
/// `{"kho": {...}}` or `{"kho-corrupt": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StepReply {
    /// An agent request's payload.
    Agent(Payload),
    /// A `kho-scan` step's view.
    Kho {
        /// What the KHO observer read.
        kho: Box<KhoView>,
    },
    /// An `if <feature>:` step on a kernel that lacks the feature: the
    /// step was not performed.
    NotOffered {
        /// The feature.
        #[serde(rename = "not-offered")]
        not_offered: KernelFeature,
    },
    /// What a `kho-corrupt` step wrote.
    KhoCorrupt {
        /// The blob and the edits.
        #[serde(rename = "kho-corrupt")]
        kho_corrupt: Box<KhoCorrupted>,
    },
}

/// Whether a run met its expectation, and how not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Every expectation held.
    pub passed: bool,
    /// The ones that did not.
    pub failures: Vec<String>,
    /// The guest kernel lacks what the scenario requires (each named and
    /// described): its steps did not run, and it neither passed nor failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_applicable: Vec<String>,
}

impl Verdict {
    /// The verdict of a scenario whose guest kernel lacks `missing`.
    pub fn not_applicable(missing: &[KernelFeature]) -> Verdict {
        Verdict {
            passed: false,
            failures: Vec::new(),
            not_applicable: missing
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.describe()))
                .collect(),
        }
    }

    /// `PASS`, `FAIL` or `n/a`.
    pub fn label(&self) -> &'static str {
        if !self.not_applicable.is_empty() {
            "n/a"
        } else if self.passed {
            "PASS"
        } else {
            "FAIL"
        }
    }
}

/// One step and its result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step as given.
    pub step: String,
    /// What it returned, for agent and kho-scan steps that succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<StepReply>,
    /// Why it failed, otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The end of the run, or a reboot of the guest, cut it short (not a
    /// failure of its own).
    #[serde(default, skip_serializing_if = "is_false")]
    pub cut_short: bool,
    /// Milliseconds from VMM start when the reply (or failure) came.
    pub at_ms: u64,
}

/// One boot of the guest (a run has several with `--on-reboot restart`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    /// 1 for the boot the run started with.
    pub index: u32,
    /// When it began, ms from VMM start.
    pub started_ms: u64,
    /// When its agent said hello.
    pub agent_ready_ms: Option<u64>,
    /// When it ended.
    pub ended_ms: u64,
    /// How it ended.
    pub end: BootEnd,
    /// What the reset did to each ledger page (the last boot has none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PageFate>,
}

/// The boots of a run as the session keeps them: those that ended, and
/// the current one's facts.
#[derive(Debug, Default)]
pub struct BootLog {
    /// The boots that ended.
    pub ended: Vec<BootRecord>,
    /// When the current boot began, ms from VMM start.
    pub started_ms: u64,
    /// When its agent said hello.
    pub agent_ms: Option<u64>,
    /// Its first line's index in the run's console history.
    pub console_start: usize,
    /// Guest kexecs before it began.
    pub kexecs_at_start: u32,
}

/// How a boot ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "how")]
pub enum BootEnd {
    /// The guest reset (i8042 or ACPI reset, KVM_SYSTEM_EVENT_RESET).
    Reset,
    /// It panicked and rebooted itself (`panic=N`).
    Panic {
        /// The panic line.
        line: String,
    },
    /// A vCPU shut down at a machine check it could not take, and the
    /// platform reset (`--on-reboot restart`).
    MachineCheckShutdown {
        /// The vCPU, the guest page and the RIP.
        detail: String,
    },
    /// The run ended with it.
    Outcome {
        /// How.
        outcome: OutcomeKind,
        /// The outcome's detail.
        detail: String,
    },
}

impl BootEnd {
    /// `reset`, `panic`, or the run's outcome (`poweroff`, `panic`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            BootEnd::Reset => "reset",
            BootEnd::Panic { .. } => "panic",
            BootEnd::MachineCheckShutdown { .. } => OutcomeKind::MachineCheckShutdown.as_str(),
            BootEnd::Outcome { outcome, .. } => outcome.as_str(),
        }
    }

    /// The panic line, the shutdown's or the outcome's detail ("" for a
    /// reset).
    pub fn detail(&self) -> &str {
        match self {
            BootEnd::Reset => "",
            BootEnd::Panic { line } => line,
            BootEnd::MachineCheckShutdown { detail } => detail,
            BootEnd::Outcome { detail, .. } => detail,
        }
    }
}

/// Memory rasvmm uses, measured at the end of the run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
pub struct MemoryUse {
    /// VmRSS of the rasvmm process, KiB.
    pub rss_kib: u64,
    /// Guest RAM resident in the process, KiB, counted as VmRSS counts
    /// (the kernel's zero page, which KVM maps for a guest's read of memory
    /// it never wrote, is not).
    pub guest_resident_kib: u64,
    /// RSS beyond guest RAM: what rasvmm itself costs, KiB.
    pub vmm_overhead_kib: u64,
}

/// Everything a run produced.
/// Written by rasvmm and read back, as this same type, by the lab harness.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// rasvmm version.
    pub rasvmm: String,
    /// How the run ended.
    pub outcome: OutcomeKind,
    /// Panic line, error, or what stopped the guest.
    pub detail: String,
    /// Console lines around the event.
    pub log: Vec<String>,
    /// Every console line of the run (bounded), for the verdict; not
    /// serialized: `log` is the report's context.
    #[serde(skip)]
    pub console: Vec<String>,
    /// Console lines the run did not keep in `console`.
    #[serde(skip)]
    pub console_dropped: u64,
    /// Milliseconds from VMM start to the agent's hello.
    pub agent_ready_ms: Option<u64>,
    /// Guest kernel release, from the agent.
    pub guest_kernel: Option<String>,
    /// CPUs the guest sees, from the agent.
    pub guest_cpus: Option<u32>,
    /// What the guest kernel offers, from the agent's first hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_features: Option<Vec<KernelFeature>>,
    /// Agent steps in order.
    pub steps: Vec<StepRecord>,
    /// Signals the agent's page holders received.
    pub signals: Vec<SignalReport>,
    /// When each signal arrived, ms from VMM start.
    pub signal_ms: Vec<u64>,
    /// Agent lines rasvmm rejected.
    pub agent_errors: Vec<String>,
    /// Poisonings, injections and consumptions, in order.
    pub ras_events: Vec<RasEvent>,
    /// The poison ledger at the end of the run.
    pub ledger: Vec<Entry>,
    /// Every boot, in order, with what each reset did to the ledger's pages.
    #[serde(default)]
    pub boots: Vec<BootRecord>,
    /// The GHES error sources at the end of the run.
    pub ghes: Vec<crate::ghes_sources::SourceState>,
    /// Milliseconds from VMM start to the outcome.
    pub elapsed_ms: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// CPU profile name.
    pub cpu_profile: String,
    /// MCG_CAP the guest sees.
    pub mcg_cap: u64,
    /// Bits of it rasvmm supplies by answering the guest's MCG_CAP reads
    /// (SER_P for an Intel profile on an SVM host).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mcg_cap_supplied: u64,
    /// Why memory errors cannot be reported recoverably here, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ras_limitation: Option<String>,
    /// Memory rasvmm used.
    pub memory_use: MemoryUse,
    /// The scenario run, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<String>,
    /// Its verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

impl RunReport {
    /// A short human summary, one fact per line.
    pub fn human(&self) -> String {
        let mut s = format!("outcome: {}", self.outcome.as_str());
        if !self.detail.is_empty() {
            s += &format!(" ({})", self.detail);
        }
        s.push('\n');
        if let Some(ms) = self.agent_ready_ms {
            s += &format!(
                "agent ready: {:.2} s (guest kernel {}, {} CPUs)\n",
                ms as f64 / 1000.0,
                self.guest_kernel.as_deref().unwrap_or("?"),
                self.guest_cpus.unwrap_or(0)
            );
        } else {
            s += "agent ready: never\n";
        }
        for (i, st) in self.steps.iter().enumerate() {
            let result = match (&st.reply, &st.error) {
                (Some(p), _) => serde_json::to_string(p).unwrap_or_default(),
                (None, Some(e)) => format!("error: {e}"),
                (None, None) => "ok".to_string(),
            };
            s += &format!("step {}: {} -> {}\n", i + 1, st.step, clip(&result, 200));
        }
        for sig in &self.signals {
            s += &format!(
                "signal: page {} pid {} signo {} code {} addr {:#x}\n",
                sig.page, sig.pid, sig.signo, sig.code, sig.addr
            );
        }
        if let Some(l) = &self.ras_limitation {
            s += &format!("note: {l}\n");
        }
        for e in &self.ras_events {
            s += &format!("ras: {}\n", serde_json::to_string(e).unwrap_or_default());
        }
        if self.boots.len() > 1 {
            for b in &self.boots {
                s += &format!(
                    "boot {}: {:.2} s to {:.2} s, {}{}{}\n",
                    b.index,
                    b.started_ms as f64 / 1000.0,
                    b.ended_ms as f64 / 1000.0,
                    b.end.name(),
                    match b.end.detail() {
                        "" => String::new(),
                        d => format!(" ({})", clip(d, 120)),
                    },
                    b.pages
                        .iter()
                        .map(|p| format!(", page {:#x} {:?}", p.gpa, p.fate))
                        .collect::<String>()
                );
            }
        }
        if matches!(
            self.outcome,
            OutcomeKind::Panic
                | OutcomeKind::TripleFault
                | OutcomeKind::VmmError
                | OutcomeKind::MachineCheckShutdown
        ) {
            for l in self.log.iter().rev().take(15).rev() {
                s += &format!("  | {l}\n");
            }
        }
        if let (Some(name), Some(v)) = (&self.scenario, &self.verdict) {
            s += &format!("verdict: {name}: {}\n", v.label());
            for f in &v.failures {
                s += &format!("  - {f}\n");
            }
            for f in &v.not_applicable {
                s += &format!("  - the guest kernel lacks {f}\n");
            }
        }
        s += &format!(
            "elapsed: {:.2} s; rasvmm RSS beyond guest RAM: {} KiB\n",
            self.elapsed_ms as f64 / 1000.0,
            self.memory_use.vmm_overhead_kib
        );
        s
    }

    /// Builds a report from an outcome and the facts gathered.
    pub fn new(outcome: Outcome, profile: &'static str, vcpus: u8, memory_mib: u64) -> Self {
        RunReport {
            rasvmm: env!("CARGO_PKG_VERSION").to_string(),
            outcome: outcome.kind,
            detail: outcome.detail,
            log: outcome.log,
            console: Vec::new(),
            console_dropped: 0,
            agent_ready_ms: None,
            guest_kernel: None,
            guest_cpus: None,
            guest_features: None,
            steps: Vec::new(),
            signals: Vec::new(),
            signal_ms: Vec::new(),
            agent_errors: Vec::new(),
            ras_events: Vec::new(),
            ledger: Vec::new(),
            boots: Vec::new(),
            ghes: Vec::new(),
            elapsed_ms: 0,
            vcpus,
            memory_mib,
            cpu_profile: profile.to_string(),
            mcg_cap: 0,
            mcg_cap_supplied: 0,
            ras_limitation: None,
            memory_use: MemoryUse::default(),
            scenario: None,
            verdict: None,
        }
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// An error with its chain of causes, on one line ("what: why: why").
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// VmRSS of this process in KiB.
pub fn process_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[cfg(test)]
mod tests;
