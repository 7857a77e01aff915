//! The session's side of RAS events and host memory failures: events
//! recorded (with the CPER records they say rasvmm wrote), the host's
//! early reports and the reports vCPUs saw, turned into ledger entries,
//! events and (for rasvmm's own memory) the run's end; and the
//! `host-poison` step, which makes host memory fail from outside rasvmm.

use std::time::{Duration, Instant};

use crate::config::HostMceKill;
use crate::event::RasEvent;
use crate::host_poison::{self, VmmPage};
use crate::ras_controller::{HostReport, Injection, RasError};
use crate::session::{Session, MAX_RAS_EVENTS};
use crate::steps::{HostPoisonTarget, StepError};

/// How long a `host-poison` step waits for the host's early report of a
/// page before it poisons the next.
const REPORT_WAIT: Duration = Duration::from_secs(5);

impl Session {
    /// Injects a memory error (see [`crate::ras_controller::RasController::inject`]).
    pub fn inject(&mut self, inj: &Injection, received: Instant) -> Result<(), RasError> {
        let e = self.vm.ras().inject(inj, received)?;
        self.record_ghes(e);
        Ok(())
    }

    /// Poisons a page (see [`crate::ras_controller::RasController::poison`]).
    pub fn poison(&mut self, gpa: u64) -> Result<(), RasError> {
        let e = self.vm.ras().poison(gpa)?;
        self.record(e);
        Ok(())
    }

    /// Records an event, remembering the address of every CPER record it
    /// says rasvmm wrote (a GHES report, an injection or a consumption
    /// reported with a record), for checking the guest's decode.
    pub(crate) fn record_ghes(&mut self, e: RasEvent) {
        let written = match &e {
            RasEvent::GhesReported { gpa: Some(a), .. } => Some(*a),
            RasEvent::Consumed {
                gpa, ghes: Some(_), ..
            }
            | RasEvent::Injected {
                gpa, ghes: Some(_), ..
            } => Some(*gpa),
            RasEvent::HostMemoryError {
                gpa: Some(gpa),
                told: Some(ras::ledger::Told::Ghes { .. }),
                ..
            } => Some(*gpa),
            _ => None,
        };
        if let Some(a) = written {
            if self.ghes_addresses.len() < MAX_RAS_EVENTS {
                self.ghes_addresses.insert(a);
            }
        }
        self.record(e);
    }

    /// A RAS event from a vCPU thread. An access that hit failed memory
    /// outside guest RAM ends the run.
    pub(crate) fn ras_event(&mut self, e: RasEvent) {
        if let RasEvent::HostMemoryError {
            gpa: None,
            code,
            hva,
            vcpu,
            ..
        } = &e
        {
            let o = self.classifier.host_memory_error(format!(
                "host memory error ({}) at host address {hva:#x} on vCPU {}: not guest RAM",
                code.as_str(),
                vcpu.unwrap_or(0)
            ));
            self.finish(o);
        }
        self.record_ghes(e);
    }

    /// The host kernel reported early that the memory at `hva` failed.
    pub(crate) fn host_report(&mut self, code: i32, hva: u64, tell: bool) {
        match self.vm.ras().host_reported(code, hva, tell) {
            HostReport::Guest(e) => self.record_ghes(e),
            HostReport::Vmm { event, detail } => {
                self.record(event);
                let o = self.classifier.host_memory_error(detail);
                self.finish(o);
            }
        }
    }

    /// Has a helper process poison host frames under rasvmm (the
    /// `host-poison` step); the host's reports follow as events. With early
    /// reports, guest pages are poisoned one at a time, each once rasvmm
    /// has taken the host's report of the previous (and the step returns
    /// once the last one's is in): Linux sends
    /// BUS_MCEERR_AO as a standard signal, and one sent while another is
    /// still pending is lost (docs/host-poison.md).
    pub(crate) fn host_poison(&mut self, target: &HostPoisonTarget) -> Result<(), StepError> {
        let failed = |e: &dyn std::fmt::Display| StepError::Failed(e.to_string());
        let exe = std::env::current_exe().map_err(|e| failed(&e))?;
        let (gpas, hvas) = match target {
            HostPoisonTarget::Guest(pages) => {
                let gpas = self.refs.gpas(pages).map_err(|e| failed(&e))?;
                let hvas = self
                    .vm
                    .ras()
                    .host_addresses(&gpas)
                    .map_err(|e| failed(&e))?;
                (gpas.into_iter().map(Some).collect::<Vec<_>>(), hvas)
            }
            HostPoisonTarget::Vmm => {
                let page = VmmPage::new().map_err(|e| failed(&e))?;
                let hva = page.hva();
                // rasvmm never touches the page again, poisoned or not; it
                // stays mapped for the life of the process.
                std::mem::forget(page);
                (vec![None], vec![hva])
            }
        };
        // With early reports each guest page's report is awaited, even for
        // one page: until it is in, the page is not in the ledger, and a
        // later step could have rasvmm read it.
        let await_reports = self.vm.config().host_mce_kill == HostMceKill::Early
            && matches!(target, HostPoisonTarget::Guest(_));
        let batches: Vec<(Vec<Option<u64>>, Vec<u64>)> = if await_reports {
            gpas.into_iter()
                .zip(hvas)
                .map(|(g, h)| (vec![g], vec![h]))
                .collect()
        } else {
            vec![(gpas, hvas)]
        };
        for (gpas, hvas) in batches {
            let seen = self.ras_events.len();
            let pfns = host_poison::poison_from_outside(&exe, &hvas).map_err(|e| failed(&e))?;
            let at_ms = self.vm.ras().now_ms();
            for ((&gpa, &hva), host_pfn) in gpas.iter().zip(&hvas).zip(pfns) {
                self.record(RasEvent::HostPoisoned {
                    hva,
                    gpa,
                    host_pfn,
                    at_ms,
                });
            }
            if await_reports {
                let hva = hvas[0];
                let until = Instant::now() + REPORT_WAIT;
                while !self.reported_since(seen, hva) {
                    if self.outcome.is_some() {
                        return Err(StepError::Ended);
                    }
                    if Instant::now() >= until {
                        return Err(failed(&format!(
                            "the host's early report for host address {hva:#x} did not arrive within {} s",
                            REPORT_WAIT.as_secs()
                        )));
                    }
                    self.wait(Duration::from_millis(5));
                }
            }
        }
        Ok(())
    }

    /// Whether a host report for `hva` was recorded after the first `seen`
    /// events.
    fn reported_since(&self, seen: usize, hva: u64) -> bool {
        self.ras_events
            .iter()
            .skip(seen)
            .any(|e| matches!(e, RasEvent::HostMemoryError { hva: h, .. } if *h == hva))
    }
}
