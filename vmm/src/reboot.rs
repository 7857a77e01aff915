//! Guest reboots under `--on-reboot restart`: the session ends the boot,
//! has the VM build the next one on the same memory, and goes on.
//!
//! A reboot is a guest reset (x86: the i8042 reset line or the ACPI reset
//! register; arm64: PSCI SYSTEM_RESET, which KVM reports as
//! KVM_SYSTEM_EVENT_RESET), after a panic too when the kernel reboots by
//! itself (`panic=N`, N > 0). Without `restart`, or after a panic the guest
//! will not reboot from, a reset ends the run as it always did.
//!
//! What survives a reboot: guest memory (with each poisoned page kept bad
//! or replaced, see [`crate::ras_controller::RasController::at_reset`]),
//! the event queue, the ledger, the step references and every record of
//! the run. What does not: the vCPUs, devices, KVM VM and agent of the old
//! boot, and what its kernel believed. Events the old boot queued after
//! its reset are dropped, except RAS events (kept) and control API
//! requests (served in the new boot); agent requests it never answered
//! fail with "the guest rebooted before the agent replied".

use crate::api::Answer;
use crate::config::{OnReboot, MAX_BOOTS};
use crate::event::VmEvent;
use crate::kho_observer::KhoTracker;
use crate::report::{one_line, BootEnd, BootRecord};
use crate::session::Session;
use crate::steps::StepError;

impl Session {
    /// The boot running now (1 for the first).
    pub fn boot(&self) -> u32 {
        u32::try_from(self.boots.ended.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// The guest reset: the run ends, or (with `--on-reboot restart`) the
    /// next boot starts.
    pub(crate) fn guest_reset(&mut self) {
        self.reset_machine(None);
    }

    /// A vCPU shut down at a machine check it could not take (`detail`
    /// names it, the page and the RIP): the run ends with outcome
    /// `machine-check-shutdown`, or (with `--on-reboot restart`) the
    /// platform resets, as boards do after a shutdown, and the next boot
    /// starts.
    pub(crate) fn machine_check_shutdown(&mut self, detail: String) {
        self.reset_machine(Some(detail));
    }

    fn reset_machine(&mut self, shutdown: Option<String>) {
        if self.outcome.is_some() {
            return;
        }
        let reboot = self.vm.config().reboot;
        let panicked = self.classifier.panic_line().map(str::to_string);
        let restart = reboot.on_reboot == OnReboot::Restart
            && (shutdown.is_some() || panicked.is_none() || self.vm.config().panic_is_reboot());
        if !restart {
            let o = match shutdown {
                Some(d) => self.classifier.machine_check_shutdown(d),
                None => self.classifier.reset(),
            };
            self.finish(o);
            return;
        }
        let boot = self.boot();
        if boot >= MAX_BOOTS {
            let o = self.classifier.reboot_loop(boot);
            self.finish(o);
            return;
        }
        let ended_ms = self.vm.ras().now_ms();
        let joined = self.vm.end_boot();
        // No vCPU of the old boot runs: whatever it queued is here now.
        let stale: Vec<VmEvent> = self.vm.events().try_iter().collect();
        let mut api = Vec::new();
        for e in stale {
            match e {
                VmEvent::Console(line) => self.console.push(&line),
                VmEvent::Ras(e) => self.ras_event(e),
                VmEvent::Api(call) => api.push(call),
                // Before the reset decides the pages' fates: the page goes
                // into the ledger as the host's (no kernel runs to tell),
                // and is remapped or kept with the others.
                VmEvent::HostMemoryError { code, hva } => self.host_report(code, hva, false),
                VmEvent::Einj(op) => self.einj_cut_off(op),
                // The old boot's agent, further resets and stops.
                VmEvent::Agent(_)
                | VmEvent::Reset
                | VmEvent::PowerOff
                | VmEvent::Stopped { .. } => {}
            }
        }
        if self.outcome.is_some() {
            // rasvmm's own memory failed meanwhile.
            return;
        }
        if !joined {
            let o = self
                .classifier
                .vmm_error(format!("a vCPU thread of boot {boot} panicked"));
            self.finish(o);
            return;
        }
        // A reset that fails still ends its boot with what it did.
        let (pages, failed) = match self.vm.reset_memory(reboot.keep_poison_on_reset) {
            Ok(p) => (p, None),
            Err(e) => (Vec::new(), Some(one_line(&e))),
        };
        self.boots.ended.push(BootRecord {
            index: boot,
            started_ms: self.boots.started_ms,
            agent_ready_ms: self.boots.agent_ms.take(),
            ended_ms,
            end: match (shutdown, panicked) {
                (Some(detail), _) => BootEnd::MachineCheckShutdown { detail },
                (None, Some(line)) => BootEnd::Panic { line },
                (None, None) => BootEnd::Reset,
            },
            pages,
        });
        self.boots.started_ms = self.vm.ras().now_ms();
        self.boots.console_start = self.console.len();
        self.classifier.new_boot();
        if let Some(e) = failed {
            let o = self.classifier.vmm_error(e);
            self.finish(o);
            return;
        }
        if let Err(e) = self.vm.next_boot() {
            // The next boot never ran: its record says why.
            let o = self.classifier.vmm_error(one_line(&e));
            self.finish(o);
            return;
        }
        self.agent_up = false;
        self.boots.kexecs_at_start = self.kexecs;
        // The roots in memory now are the old kernels': the new kernel's
        // is the one that is new at its hello.
        self.kho = KhoTracker::new();
        self.vm.ras().kho_before_kexec(&mut self.kho);
        for (_, (_, _, api_id, conn)) in std::mem::take(&mut self.api_pending) {
            let _ = conn.send(Answer::err(api_id, StepError::Rebooted));
        }
        let tx = self.vm.event_sender();
        for call in api {
            let _ = tx.send(VmEvent::Api(call));
        }
        self.publish(&serde_json::json!({
            "event": "guest-reset",
            "boot": boot + 1,
            "at_ms": self.boots.started_ms,
        }));
    }

    /// Waits until boot `n` (or a later one) is running and its agent
    /// said hello.
    pub(crate) fn wait_boot(&mut self, n: u32) -> Result<(), StepError> {
        while self.boot() < n || !self.agent_up {
            if self.outcome.is_some() {
                return Err(StepError::Ended);
            }
            self.step();
        }
        Ok(())
    }

    /// Waits until a console line of the current boot contains `text`
    /// (lines beyond the console history's bound are not seen).
    pub(crate) fn wait_console(&mut self, text: &str) -> Result<(), StepError> {
        while !self.console.contains_since(self.boots.console_start, text) {
            if self.outcome.is_some() {
                return Err(StepError::Ended);
            }
            self.step();
        }
        Ok(())
    }

    /// The boots so far, the current one last, ended by `outcome` if the
    /// run is over.
    pub fn boot_records(&self) -> Vec<BootRecord> {
        let mut boots = self.boots.ended.clone();
        boots.push(BootRecord {
            index: self.boot(),
            started_ms: self.boots.started_ms,
            agent_ready_ms: self.boots.agent_ms,
            ended_ms: self.vm.ras().now_ms(),
            end: match &self.outcome {
                Some(o) => BootEnd::Outcome {
                    outcome: o.kind,
                    detail: o.detail.clone(),
                },
                None => BootEnd::Reset,
            },
            pages: Vec::new(),
        });
        boots
    }
}
