//! How a run ended, decided from what the guest printed and how it stopped.
//!
//! Every run ends with exactly one [`OutcomeKind`]. The [`Classifier`] is a
//! pure state machine fed with console lines and stop events, so its rules
//! are unit-tested without a guest. Linux's own messages are the evidence:
//! "Kernel panic - not syncing: " (kernel/panic.c) marks a panic,
//! "reboot: Power down" and "reboot: Restarting system" (kernel/reboot.c)
//! an orderly power-off or reboot.
//!
//! With `--on-reboot restart` a reset starts the next boot instead of
//! ending the run, and a panic whose kernel will reboot by itself
//! (`panic=N`, N > 0, on its command line: [`crate::config::panic_reboots`]) ends only
//! its boot; the session tells the classifier so
//! ([`Classifier::set_panic_reboots`]) and starts each boot afresh
//! ([`Classifier::new_boot`]).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// The classified end of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeKind {
    /// The guest powered itself off.
    Poweroff,
    /// The guest rebooted (i8042 reset or KVM reset event) without a panic.
    Reboot,
    /// The guest kernel panicked.
    Panic,
    /// The vCPU triple-faulted (KVM_EXIT_SHUTDOWN) without a panic first.
    TripleFault,
    /// The deadline passed first.
    Timeout,
    /// rasvmm itself failed (a KVM error, an exit it cannot handle).
    VmmError,
    /// Stopped on request (the control API's shutdown).
    Stopped,
    /// The host's memory under rasvmm itself failed (not guest RAM, or
    /// rasvmm's firmware pages): the run cannot go on (exit status 4).
    HostMemoryError,
    /// A vCPU took a machine check it could not take (CR4.MCE clear, or
    /// MCIP already set): real hardware shuts the CPU down.
    MachineCheckShutdown,
    /// With `--on-reboot restart`, the guest kept rebooting: it reset
    /// again after the most boots a run makes.
    RebootLoop,
}

impl OutcomeKind {
    /// The name used in reports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Poweroff => "poweroff",
            OutcomeKind::Reboot => "reboot",
            OutcomeKind::Panic => "panic",
            OutcomeKind::TripleFault => "triple-fault",
            OutcomeKind::Timeout => "timeout",
            OutcomeKind::VmmError => "vmm-error",
            OutcomeKind::Stopped => "stopped",
            OutcomeKind::HostMemoryError => "host-memory-error",
            OutcomeKind::MachineCheckShutdown => "machine-check-shutdown",
            OutcomeKind::RebootLoop => "reboot-loop",
        }
    }

    /// Parses a name from [`OutcomeKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            OutcomeKind::Poweroff,
            OutcomeKind::Reboot,
            OutcomeKind::Panic,
            OutcomeKind::TripleFault,
            OutcomeKind::Timeout,
            OutcomeKind::VmmError,
            OutcomeKind::Stopped,
            OutcomeKind::HostMemoryError,
            OutcomeKind::MachineCheckShutdown,
            OutcomeKind::RebootLoop,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A classified outcome with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// What happened.
    pub kind: OutcomeKind,
    /// The panic line, the error, or what stopped the guest.
    pub detail: String,
    /// Console lines leading up to (and, for a panic, following) the event.
    pub log: Vec<String>,
}

/// Console lines kept as context.
const TAIL_LINES: usize = 60;

/// Most console bytes a run keeps for its verdict (`log_contains`).
const MAX_HISTORY_BYTES: usize = 8 << 20;

/// Every console line of a run, up to [`MAX_HISTORY_BYTES`], for checks
/// that look beyond the outcome's context (a line printed early in a
/// kexec'd kernel's boot). Not part of the serialized report.
#[derive(Debug, Default)]
pub struct ConsoleHistory {
    lines: Vec<String>,
    bytes: usize,
    /// Lines that did not fit.
    pub dropped: u64,
}

impl ConsoleHistory {
    /// Keeps `line` if there is room.
    pub fn push(&mut self, line: &str) {
        if self.bytes + line.len() > MAX_HISTORY_BYTES {
            self.dropped += 1;
            return;
        }
        self.bytes += line.len();
        self.lines.push(line.to_string());
    }

    /// Lines kept so far.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no line was kept.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Whether a line kept at index `from` or later contains `needle`.
    pub fn contains_since(&self, from: usize, needle: &str) -> bool {
        self.lines
            .get(from..)
            .is_some_and(|l| l.iter().any(|l| l.contains(needle)))
    }

    /// The lines kept.
    pub fn into_lines(self) -> Vec<String> {
        self.lines
    }
}
/// Lines kept after a panic line (the panic's own report and backtrace).
const AFTER_PANIC_LINES: usize = 80;

const PANIC_MARK: &str = "Kernel panic - not syncing: ";
const PANIC_END_MARK: &str = "---[ end Kernel panic - not syncing";
const POWER_DOWN_MARK: &str = "reboot: Power down";
const HALTED_MARK: &str = "reboot: System halted";
/// Printed by kernel_power_off() when no power-off method exists (no ACPI):
/// the guest asked to power off and halts instead.
const POWER_OFF_UNAVAILABLE_MARK: &str = "reboot: Power off not available";

/// Turns console lines and stop events into an [`Outcome`].
#[derive(Debug, Default)]
pub struct Classifier {
    tail: VecDeque<String>,
    panic: Option<(String, Vec<String>)>,
    /// A panic ends its boot, not the run: the kernel reboots by itself.
    panic_reboots: bool,
}

impl Classifier {
    /// A classifier that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The panic line, once one was printed (this boot).
    pub fn panic_line(&self) -> Option<&str> {
        self.panic.as_ref().map(|(l, _)| l.as_str())
    }

    /// Whether a panic is followed by the guest's own reboot (which then
    /// starts the next boot): its end no longer ends the run. A guest that
    /// panics and never resets still ends as a panic at the deadline.
    pub fn set_panic_reboots(&mut self, reboots: bool) {
        self.panic_reboots = reboots;
    }

    /// A new boot: the last one's panic is its own, not this one's.
    pub fn new_boot(&mut self) {
        self.panic = None;
    }

    /// Feeds one console line; returns the outcome if the line ends the run.
    pub fn console_line(&mut self, line: &str) -> Option<Outcome> {
        let line = line.trim_end_matches('\r');
        if let Some((_, log)) = &mut self.panic {
            if log.len() < TAIL_LINES + AFTER_PANIC_LINES {
                log.push(line.to_string());
            }
            if line.contains(PANIC_END_MARK) && !self.panic_reboots {
                return Some(self.panic_outcome());
            }
            return None;
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
        if let Some(pos) = line.find(PANIC_MARK) {
            let panic_line = line[pos..].to_string();
            self.panic = Some((panic_line, self.tail.iter().cloned().collect()));
            return None;
        }
        if line.contains(POWER_DOWN_MARK) {
            return Some(self.outcome(OutcomeKind::Poweroff, POWER_DOWN_MARK.into()));
        }
        if line.contains(POWER_OFF_UNAVAILABLE_MARK) {
            return Some(self.outcome(OutcomeKind::Poweroff, POWER_OFF_UNAVAILABLE_MARK.into()));
        }
        if line.contains(HALTED_MARK) {
            return Some(self.outcome(OutcomeKind::Poweroff, HALTED_MARK.into()));
        }
        None
    }

    /// The guest reset itself (i8042 0xfe, KVM_SYSTEM_EVENT_RESET).
    pub fn reset(&mut self) -> Outcome {
        if self.panic.is_some() {
            return self.panic_outcome();
        }
        self.outcome(OutcomeKind::Reboot, "guest reset".into())
    }

    /// The guest kept rebooting: it reset again after `boots` boots.
    pub fn reboot_loop(&mut self, boots: u32) -> Outcome {
        let mut o = self.reset();
        o.kind = OutcomeKind::RebootLoop;
        o.detail = match self.panic_line() {
            Some(p) => format!("the guest reset after {boots} boots, the last ending in '{p}'"),
            None => format!("the guest reset after {boots} boots"),
        };
        o
    }

    /// The guest powered off by a KVM system event or ACPI S5 (`how`).
    pub fn power_off(&mut self, how: &str) -> Outcome {
        if self.panic.is_some() {
            return self.panic_outcome();
        }
        self.outcome(OutcomeKind::Poweroff, how.into())
    }

    /// A vCPU triple-faulted; `state` is its register and event state.
    pub fn triple_fault(&mut self, vcpu: u8, state: &str) -> Outcome {
        if self.panic.is_some() {
            return self.panic_outcome();
        }
        let mut o = self.outcome(
            OutcomeKind::TripleFault,
            format!("vCPU {vcpu} triple fault"),
        );
        if !state.is_empty() {
            o.log
                .push(format!("rasvmm: vCPU {vcpu} at the triple fault: {state}"));
        }
        o
    }

    /// The deadline passed. A guest that panicked and then hung (panic=0)
    /// still counts as a panic.
    pub fn deadline(&mut self, after_secs: f64) -> Outcome {
        if self.panic.is_some() {
            return self.panic_outcome();
        }
        self.outcome(
            OutcomeKind::Timeout,
            format!("no outcome within {after_secs:.1} s"),
        )
    }

    /// Stopped on request.
    pub fn stopped(&mut self, why: String) -> Outcome {
        self.outcome(OutcomeKind::Stopped, why)
    }

    /// rasvmm failed.
    pub fn vmm_error(&mut self, error: String) -> Outcome {
        self.outcome(OutcomeKind::VmmError, error)
    }

    /// The host's memory under rasvmm itself failed (`what`: where).
    pub fn host_memory_error(&mut self, what: String) -> Outcome {
        self.outcome(OutcomeKind::HostMemoryError, what)
    }

    /// A vCPU took a machine check it could not take (`what`: which, where).
    pub fn machine_check_shutdown(&mut self, what: String) -> Outcome {
        self.outcome(OutcomeKind::MachineCheckShutdown, what)
    }

    fn outcome(&self, kind: OutcomeKind, detail: String) -> Outcome {
        Outcome {
            kind,
            detail,
            log: self.tail.iter().cloned().collect(),
        }
    }

    fn panic_outcome(&self) -> Outcome {
        let (line, log) = self.panic.clone().unwrap_or_default();
        Outcome {
            kind: OutcomeKind::Panic,
            detail: line,
            log,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_down_line_is_poweroff() {
        let mut c = Classifier::new();
        assert!(c
            .console_line("[    1.0] Run /init as init process")
            .is_none());
        let o = c.console_line("[    2.5] reboot: Power down\r").unwrap();
        assert_eq!(o.kind, OutcomeKind::Poweroff);
        assert_eq!(o.log.len(), 2);
    }

    #[test]
    fn power_off_without_acpi_is_poweroff() {
        let mut c = Classifier::new();
        let o = c
            .console_line("[ 3.30] reboot: Power off not available: System halted instead")
            .unwrap();
        assert_eq!(o.kind, OutcomeKind::Poweroff);
    }

    #[test]
    fn panic_then_reset_is_panic_with_context() {
        let mut c = Classifier::new();
        for i in 0..100 {
            c.console_line(&format!("line {i}"));
        }
        c.console_line("[   3.1] sysrq: Trigger a crash");
        assert!(c
            .console_line("[   3.1] Kernel panic - not syncing: sysrq triggered crash")
            .is_none());
        c.console_line("[   3.1] CPU: 0 UID: 0 PID: 1 Comm: sh");
        assert_eq!(
            c.panic_line(),
            Some("Kernel panic - not syncing: sysrq triggered crash")
        );
        let o = c.reset();
        assert_eq!(o.kind, OutcomeKind::Panic);
        assert_eq!(
            o.detail,
            "Kernel panic - not syncing: sysrq triggered crash"
        );
        assert_eq!(o.log.len(), TAIL_LINES + 1);
        assert!(o.log.iter().any(|l| l.contains("sysrq: Trigger a crash")));
        assert!(o.log.last().unwrap().contains("Comm: sh"));
    }

    #[test]
    fn panic_end_marker_ends_the_run() {
        let mut c = Classifier::new();
        c.console_line("Kernel panic - not syncing: Fatal exception");
        let o = c
            .console_line("---[ end Kernel panic - not syncing: Fatal exception ]---")
            .unwrap();
        assert_eq!(o.kind, OutcomeKind::Panic);
    }

    #[test]
    fn power_down_after_panic_does_not_hide_it() {
        let mut c = Classifier::new();
        c.console_line("Kernel panic - not syncing: x");
        assert!(c.console_line("reboot: Power down").is_none());
        assert_eq!(c.deadline(1.0).kind, OutcomeKind::Panic);
        assert_eq!(c.triple_fault(0, "").kind, OutcomeKind::Panic);
    }

    #[test]
    fn stops_without_panic() {
        assert_eq!(Classifier::new().reset().kind, OutcomeKind::Reboot);
        let t = Classifier::new().triple_fault(1, "rip 0x10");
        assert_eq!(t.kind, OutcomeKind::TripleFault);
        assert_eq!(
            t.log.last().map(String::as_str),
            Some("rasvmm: vCPU 1 at the triple fault: rip 0x10")
        );
        assert_eq!(Classifier::new().deadline(5.0).kind, OutcomeKind::Timeout);
        assert_eq!(
            Classifier::new().vmm_error("x".into()).kind,
            OutcomeKind::VmmError
        );
    }

    #[test]
    fn a_panic_that_reboots_ends_its_boot_not_the_run() {
        let mut c = Classifier::new();
        c.set_panic_reboots(true);
        c.console_line("Kernel panic - not syncing: Memory failure: 0x141: unrecoverable page");
        assert!(c
            .console_line("---[ end Kernel panic - not syncing: Memory failure ]---")
            .is_none());
        assert_eq!(
            c.panic_line(),
            Some("Kernel panic - not syncing: Memory failure: 0x141: unrecoverable page")
        );
        // A panicked guest that never resets is still a panic at the deadline.
        assert_eq!(c.deadline(1.0).kind, OutcomeKind::Panic);
        c.new_boot();
        assert_eq!(c.panic_line(), None);
        assert_eq!(c.deadline(1.0).kind, OutcomeKind::Timeout);
        let o = c.console_line("reboot: Power down").unwrap();
        assert_eq!(o.kind, OutcomeKind::Poweroff);
    }

    #[test]
    fn a_reboot_loop_names_the_boots_and_the_last_panic() {
        let mut c = Classifier::new();
        assert_eq!(c.reboot_loop(16).detail, "the guest reset after 16 boots");
        c.console_line("Kernel panic - not syncing: Fatal machine check");
        let o = c.reboot_loop(16);
        assert_eq!(o.kind, OutcomeKind::RebootLoop);
        assert_eq!(
            o.detail,
            "the guest reset after 16 boots, the last ending in 'Kernel panic - not syncing: Fatal machine check'"
        );
    }

    #[test]
    fn panic_log_is_bounded() {
        let mut c = Classifier::new();
        c.console_line("Kernel panic - not syncing: x");
        for i in 0..10_000 {
            c.console_line(&format!("trace {i}"));
        }
        assert!(c.reset().log.len() <= TAIL_LINES + AFTER_PANIC_LINES);
    }

    #[test]
    fn names_round_trip() {
        for k in [
            "poweroff",
            "reboot",
            "panic",
            "triple-fault",
            "timeout",
            "vmm-error",
            "stopped",
            "reboot-loop",
        ] {
            assert_eq!(OutcomeKind::parse(k).unwrap().as_str(), k);
        }
        assert!(OutcomeKind::parse("crash").is_none());
    }
}
