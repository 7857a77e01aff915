//! The guest's own error injections (ACPI EINJ): a request the guest wrote
//! into the EINJ window, checked and carried out the way every other memory
//! error is. Memory uncorrectable makes the page bad like failed DRAM (its
//! next access raises SRAR or an SEA); correctable and fatal report a
//! corrected or fatal CPER record for the page through the architecture's
//! default GHES source. A refused request changes nothing.

use ras::cper::Severity;
use ras::einj::{self, CommandStatus, Kind, Request};
use ras::ledger;

use super::{lock, GhesInjection, RasController, RasError};
use crate::event::RasEvent;

/// Most pages the guest may make bad through EINJ in one run: each takes a
/// frame of host memory offline (MADV_HWPOISON), and the guest is the
/// system under test.
pub const MAX_GUEST_EINJ_PAGES: usize = 256;

/// What rasvmm answered an EINJ request.
#[derive(Debug)]
pub struct EinjAnswer {
    /// The command status the guest reads.
    pub status: CommandStatus,
    /// The request and its answer, for the report and the event stream.
    pub event: RasEvent,
    /// What the request reported or poisoned, if it got that far.
    pub effect: Option<RasEvent>,
}

impl RasController {
    /// The event for an EINJ request and its answer.
    fn einj_event(
        &self,
        request: &Request,
        kind: Option<Kind>,
        gpa: Option<u64>,
        status: CommandStatus,
        reason: Option<String>,
    ) -> RasEvent {
        RasEvent::GuestEinj {
            request: *request,
            kind,
            gpa,
            status,
            reason,
            at_ms: self.now_ms(),
        }
    }

    /// The event for an EINJ request of the old boot that the guest's reset
    /// cut off before rasvmm answered it: nothing was done.
    pub fn einj_cut_off(&self, request: &Request) -> RasEvent {
        let why = "the guest reset before rasvmm answered; nothing was done";
        self.einj_event(
            request,
            None,
            None,
            CommandStatus::UnknownFailure,
            Some(why.into()),
        )
    }

    /// Carries out an EINJ request the guest made.
    pub fn guest_einj(&self, request: &Request) -> EinjAnswer {
        let answer = |status, kind, gpa, reason: Option<String>, effect| EinjAnswer {
            status,
            event: self.einj_event(request, kind, gpa, status, reason),
            effect,
        };
        let planned = match einj::validate(request) {
            Ok(p) => p,
            Err(e) => {
                return answer(
                    CommandStatus::InvalidAccess,
                    None,
                    None,
                    Some(e.to_string()),
                    None,
                )
            }
        };
        let (kind, gpa) = (Some(planned.kind), Some(planned.page));
        if let Err(e) = self.check_gpa(planned.page).and_then(|()| {
            if lock(&self.firmware).contains(&planned.page) {
                Err(RasError::Firmware(planned.page))
            } else {
                Ok(())
            }
        }) {
            return answer(
                CommandStatus::InvalidAccess,
                kind,
                gpa,
                Some(e.to_string()),
                None,
            );
        }
        let done = match planned.kind {
            Kind::Uncorrectable
                if !lock(&self.ledger).is_sticky(planned.page)
                    && lock(&self.ledger).count(ledger::Source::GuestEinj)
                        >= MAX_GUEST_EINJ_PAGES =>
            {
                let why = format!(
                    "the guest has made {MAX_GUEST_EINJ_PAGES} pages bad through EINJ, the most \
                     rasvmm takes host memory offline for"
                );
                return answer(CommandStatus::UnknownFailure, kind, gpa, Some(why), None);
            }
            Kind::Uncorrectable => self.make_bad(planned.page, ledger::Source::GuestEinj),
            Kind::Correctable | Kind::Fatal => self.ghes_memory_error(&GhesInjection {
                source: arch::ras::DEFAULT_GHES_SOURCE,
                severity: if planned.kind == Kind::Fatal {
                    Severity::Fatal
                } else {
                    Severity::Corrected
                },
                gpa: planned.page,
                threshold_exceeded: false,
                vcpu: 0,
            }),
        };
        match done {
            Ok(effect) => answer(CommandStatus::Success, kind, gpa, None, Some(effect)),
            Err(e) => answer(
                CommandStatus::UnknownFailure,
                kind,
                gpa,
                Some(e.to_string()),
                None,
            ),
        }
    }
}
