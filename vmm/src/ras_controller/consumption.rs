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
use ras::ledger::{self, Told};
use ras::mce::MemoryError;

use super::RasController;
use crate::config::PoisonReport;
use crate::event::{HostErrorCode, RasEvent};
use crate::ghes_sources::ConsumptionAction;
use crate::vcpu::{Consumed, HostMemoryErrors};

/// What a consuming access gets from the architecture's report.
pub(super) enum Consumption {
    /// Reported.
    Reported {
        /// Why delivery failed, if it did.
        error: Option<String>,
        /// The GHES source that carried a record of it, if one did.
        ghes: Option<Notification>,
        /// What the guest was told, if it was.
        told: Option<Told>,
    },
    /// The report is a machine check the vCPU cannot take (x86: CR4.MCE
    /// clear, or MCIP set): the CPU shuts down, as hardware does.
    /// (arm64 never: an SEA cannot be masked.)
    #[allow(dead_code)]
    Shutdown(String),
    /// Let the vCPU retry the access shortly: the report cannot be made yet
    /// (arm64's SEA source holds another vCPU's record; x86 never waits).
    #[allow(dead_code)]
    Retry,
}

impl HostMemoryErrors for RasController {
    fn consumed(&self, index: u8, fd: &VcpuFd, code: i32, hva: usize) -> Consumed {
        RasController::consumed(self, index, fd, code, hva)
    }
}

impl RasController {
    /// A host memory error on vCPU `index`'s thread: its access hit
    /// hwpoisoned host memory (BUS_MCEERR_AR; an early BUS_MCEERR_AO goes
    /// to the early-report thread, see [`RasController::host_reported`]).
    /// Tells the guest as hardware would and returns the events to record
    /// (none when the vCPU should just let the guest retry: a GHES report
    /// is being handled). A page rasvmm did not make bad goes into the
    /// ledger as the host's before the guest is told.
    pub fn consumed(&self, index: u8, fd: &VcpuFd, code: i32, hva: usize) -> Consumed {
        let now = self.now_ms();
        let host_code = HostErrorCode::from_si_code(code).unwrap_or(HostErrorCode::ActionRequired);
        let Some(gpa) = self.gpa_of(hva) else {
            return Consumed {
                events: vec![RasEvent::HostMemoryError {
                    code: host_code,
                    hva: hva as u64,
                    gpa: None,
                    vcpu: Some(index),
                    at_ms: now,
                    told: None,
                    result: Some("not guest RAM".into()),
                }],
                shutdown: None,
            };
        };
        let page = ledger::page_of(gpa);
        let mut events = Vec::new();
        let host_fault = {
            let mut l = lock(&self.ledger);
            let new = !l.is_sticky(page);
            if new {
                // Not rasvmm's doing: the host's memory failed under the page.
                let _ = l.poison(page, ledger::Source::Host, now);
            }
            new
        };
        if host_fault {
            events.push(RasEvent::HostMemoryError {
                code: host_code,
                hva: hva as u64,
                gpa: Some(page),
                vcpu: Some(index),
                at_ms: now,
                told: None,
                result: None,
            });
        }
        let error = if host_code == HostErrorCode::ActionRequired {
            MemoryError::Srar
        } else {
            MemoryError::Srao
        };
        if error == MemoryError::Srar {
            if let Some(reported) = self.consumed_via_ghes(index, fd, page, now) {
                events.extend(reported);
                return Consumed {
                    events,
                    shutdown: None,
                };
            }
        }
        let mut shutdown = None;
        let (result, ghes, told) = match self.report_consumption(index, fd, page, error) {
            Consumption::Reported { error, ghes, told } => (error, ghes, told),
            Consumption::Shutdown(why) => {
                shutdown = Some(why.clone());
                (Some(why), None, None)
            }
            Consumption::Retry => {
                // Do not spin a host CPU on the retried access.
                std::thread::sleep(Duration::from_millis(1));
                return Consumed {
                    events,
                    shutdown: None,
                };
            }
        };
        let consumptions = {
            let mut l = lock(&self.ledger);
            let n = if error == MemoryError::Srar {
                l.consume(page, now).unwrap_or(0)
            } else {
                0
            };
            if let Some(t) = told {
                l.tell(page, t);
            }
            n
        };
        events.push(RasEvent::Consumed {
            vcpu: index,
            gpa: page,
            error,
            consumptions,
            at_ms: now,
            result,
            ghes,
        });
        Consumed { events, shutdown }
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
                if matches!(&written, Ok(r) if r.submitted == Submitted::Written) {
                    lock(&self.ledger).tell(
                        page,
                        Told::Ghes {
                            source,
                            severity: Severity::Recoverable,
                        },
                    );
                }
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
