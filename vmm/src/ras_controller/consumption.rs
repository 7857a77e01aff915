//! Guest accesses to poisoned pages, reported from the accessing vCPU's own
//! thread: the architecture's synchronous error (a machine check planned by
//! [`ras::mce::plan`] on x86, an SEA with its CPER record on arm64), or,
//! with `--poison-report ghes-*`, a GHES record first and the synchronous
//! error only if the guest keeps touching the page.

use std::time::{Duration, Instant};

use devices::bus::lock;
use kvm_ioctls::VcpuFd;
use ras::cper::Severity;
use ras::ghes::{Notification, Submitted};
use ras::ledger;
use ras::mce::MemoryError;

use super::RasController;
use crate::config::PoisonReport;
use crate::event::RasEvent;
use crate::ghes_sources::ConsumptionAction;
use crate::vcpu::HostMemoryErrors;

/// What a consuming access gets from the architecture's report.
pub(super) enum Consumption {
    /// Reported.
    Reported {
        /// Why delivery failed, if it did.
        error: Option<String>,
        /// The GHES source that carried a record of it, if one did.
        ghes: Option<Notification>,
    },
    /// Let the vCPU retry the access shortly: the report cannot be made yet
    /// (arm64's SEA source holds another vCPU's record; x86 never waits).
    #[allow(dead_code)]
    Retry,
}

impl HostMemoryErrors for RasController {
    fn consumed(&self, index: u8, fd: &VcpuFd, code: i32, hva: usize) -> Option<RasEvent> {
        RasController::consumed(self, index, fd, code, hva)
    }
}

impl RasController {
    /// A host memory error on vCPU `index`'s thread: its access hit
    /// hwpoisoned host memory (BUS_MCEERR_AR), or the host found poison
    /// early (BUS_MCEERR_AO). Tells the guest as hardware would and returns
    /// the event to record, or `None` when the vCPU should just let the
    /// guest retry (a GHES report is being handled).
    pub fn consumed(&self, index: u8, fd: &VcpuFd, code: i32, hva: usize) -> Option<RasEvent> {
        let now = self.now_ms();
        let Some(gpa) = self.gpa_of(hva) else {
            return Some(RasEvent::HostErrorOutsideGuest {
                vcpu: index,
                code,
                hva: hva as u64,
            });
        };
        let page = ledger::page_of(gpa);
        let error = if code == libc::BUS_MCEERR_AR {
            MemoryError::Srar
        } else {
            MemoryError::Srao
        };
        if error == MemoryError::Srar {
            if let Some(reported) = self.consumed_via_ghes(index, fd, page, now) {
                return reported;
            }
        }
        let (result, ghes) = match self.report_consumption(index, fd, page, error) {
            Consumption::Reported { error, ghes } => (error, ghes),
            Consumption::Retry => {
                // Do not spin a host CPU on the retried access.
                std::thread::sleep(Duration::from_millis(1));
                return None;
            }
        };
        let consumptions = {
            let mut l = lock(&self.ledger);
            if error == MemoryError::Srar {
                l.consume(page, now).unwrap_or(0)
            } else {
                let _ = l.poison(page, ledger::Source::Host, now);
                0
            }
        };
        Some(RasEvent::Consumed {
            vcpu: index,
            gpa: page,
            error,
            consumptions,
            at_ms: now,
            result,
            ghes,
        })
    }

    /// In GHES mode, reports the first access to a poisoned page through the
    /// configured error source and lets the accessing vCPU retry while the
    /// guest handles it. `None` when the access must be reported as a
    /// machine check instead (MCE mode, no GHES, or escalation); otherwise
    /// the event to record, if any.
    fn consumed_via_ghes(
        &self,
        index: u8,
        fd: &VcpuFd,
        page: u64,
        now: u64,
    ) -> Option<Option<RasEvent>> {
        let (PoisonReport::Ghes(source), Some(ghes)) = (self.poison_report, &self.ghes) else {
            return None;
        };
        let action = lock(ghes).on_consumption(page, Instant::now());
        match action {
            ConsumptionAction::Escalate => None,
            ConsumptionAction::Wait => {
                // The access is retried until the guest unmaps the page; do
                // not spin a host CPU on it.
                std::thread::sleep(Duration::from_millis(1));
                Some(None)
            }
            ConsumptionAction::Report => {
                let consumptions = lock(&self.ledger).consume(page, now).unwrap_or(0);
                let written = lock(ghes).memory_error(source, Severity::Recoverable, page, false);
                let result = match written {
                    Ok(r) if r.submitted == Submitted::Written => {
                        // This thread is the vCPU: an NMI is taken before the
                        // access is retried.
                        self.ghes_notify(source, index, Some(fd))
                    }
                    Ok(_) => None,
                    Err(e) => Some(e.to_string()),
                };
                Some(Some(RasEvent::Consumed {
                    vcpu: index,
                    gpa: page,
                    error: MemoryError::Srar,
                    consumptions,
                    at_ms: now,
                    result,
                    ghes: Some(source),
                }))
            }
        }
    }
}
