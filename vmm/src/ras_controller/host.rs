//! The host's early reports (BUS_MCEERR_AO): a page of guest RAM whose host
//! memory failed goes into the ledger as the host's and the guest is told
//! with an action-optional report, as hardware that found the error by
//! patrol scrub would: an SRAO machine check on x86 (by CPU profile: a
//! broadcast #MC on Intel, a deferred error the guest finds by polling its
//! banks on AMD), a recoverable CPER record through the GSIV source on
//! arm64, or through the configured source with `--poison-report ghes-*`.
//! A report for memory that is not guest RAM, or for rasvmm's own firmware
//! pages, ends the run: rasvmm's own memory failed.

use std::time::Instant;

use devices::bus::lock;
use ras::cper::Severity;
use ras::ledger::{self, Told};
use ras::mce::MemoryError;

use super::{GhesInjection, Injection, RasController, RasError};
use crate::config::PoisonReport;
use crate::event::{HostErrorCode, RasEvent};

/// What an early host report means for the run.
#[derive(Debug)]
pub enum HostReport {
    /// A page of guest RAM: in the ledger, and the guest was told (or the
    /// event says why not).
    Guest(RasEvent),
    /// rasvmm's own memory: the run cannot go on.
    Vmm {
        /// The event to record.
        event: RasEvent,
        /// What failed, for the outcome.
        detail: String,
    },
}

impl RasController {
    /// The host kernel reported (`code`, normally BUS_MCEERR_AO) that the
    /// memory behind host address `hva` failed. With `tell` false (the
    /// guest is resetting: no kernel runs to hear it) the page only goes
    /// into the ledger.
    pub fn host_reported(&self, code: i32, hva: u64, tell: bool) -> HostReport {
        let now = self.now_ms();
        let code = HostErrorCode::from_si_code(code).unwrap_or(HostErrorCode::ActionOptional);
        let gpa = usize::try_from(hva).ok().and_then(|h| self.gpa_of(h));
        let outside = |gpa: Option<u64>, what: String| HostReport::Vmm {
            event: RasEvent::HostMemoryError {
                code,
                hva,
                gpa,
                vcpu: None,
                at_ms: now,
                told: None,
                result: Some(what.clone()),
            },
            detail: format!(
                "host memory error ({}) at host address {hva:#x}: {what}",
                code.as_str()
            ),
        };
        let Some(gpa) = gpa else {
            return outside(None, "rasvmm's own memory, not guest RAM".into());
        };
        let page = ledger::page_of(gpa);
        if lock(&self.firmware).contains(&page) {
            return outside(
                Some(page),
                format!("guest page {page:#x}, which holds rasvmm's ACPI tables or GHES blocks"),
            );
        }
        let event = |told, result| {
            HostReport::Guest(RasEvent::HostMemoryError {
                code,
                hva,
                gpa: Some(page),
                vcpu: None,
                at_ms: now,
                told,
                result,
            })
        };
        if lock(&self.remapped).contains(&page)
            && !crate::host_pages::is_poisoned(hva).unwrap_or(true)
        {
            // The report came after a reset replaced the page: it names the
            // frame that was under it, which the guest no longer has.
            return event(
                None,
                Some(
                    "the page was replaced with fresh memory at a reset: nothing to report".into(),
                ),
            );
        }
        // The ledger's lock is released before the guest is told (which
        // takes it again).
        let recorded = lock(&self.ledger).poison(page, ledger::Source::Host, now);
        let (told, result) = match recorded {
            Err(e) => (None, Some(e.to_string())),
            Ok(_) if !tell => (None, Some("the guest was resetting".into())),
            Ok(_) => match self.tell_action_optional(page) {
                Ok(t) => (Some(t), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        event(told, result)
    }

    /// Tells the guest that `page` went bad, action optional: through the
    /// GHES source `--poison-report` names, else this architecture's way
    /// (the same path as an `inject:srao` request).
    fn tell_action_optional(&self, page: u64) -> Result<Told, RasError> {
        if let (PoisonReport::Ghes(source), Some(_)) = (self.poison_report, &self.ghes) {
            let severity = Severity::Recoverable;
            self.ghes_memory_error(&GhesInjection {
                source,
                severity,
                gpa: page,
                threshold_exceeded: false,
                vcpu: 0,
            })?;
            return Ok(Told::Ghes { source, severity });
        }
        self.inject(
            &Injection {
                error: MemoryError::Srao,
                gpa: page,
                vcpu: 0,
                local: false,
            },
            Instant::now(),
        )?;
        Ok(Self::ACTION_OPTIONAL)
    }
}
