//! Memory errors on arm64: a synchronous external abort with a CPER record
//! in the SEA-notified GHESv2 source for an access (`srar`, a consumed
//! sticky page), and a recoverable CPER record through the GSIV source for
//! an asynchronous report (`srao`). Linux reaches memory_failure() from an
//! arm64 memory error only through APEI (drivers/acpi/apei/ghes.c), so
//! every report carries a record.

use std::sync::mpsc::{channel, Sender};
use std::time::{Duration, Instant};

use arch::aarch64::sea;
use devices::bus::lock;
use kvm_ioctls::VcpuFd;
use ras::cper::Severity;
use ras::ghes::{Notification, Submitted};
use ras::ledger::Told;
use ras::mce::{MceRecord, MemoryError};

use super::consumption::Consumption;
use super::{micros, vcpu_answer, GhesInjection, Injection, RasController, RasError};
use crate::event::RasEvent;
use crate::vcpu::VcpuRequest;

/// How long a consuming vCPU retries its access while the SEA source still
/// holds another vCPU's unacknowledged record, before it takes the SEA
/// without a record of its own (which the guest reports as unclaimed).
const SEA_BUSY_LIMIT: Duration = Duration::from_millis(200);

/// Raises an SEA on the vCPU's own thread; the answer goes to `reply`.
fn on_vcpu(index: u8, reply: Sender<Result<(), sea::Error>>) -> VcpuRequest {
    VcpuRequest::OnThread(Box::new(move |fd| {
        let _ = reply.send(sea::inject(fd, index));
        None
    }))
}

impl RasController {
    /// What an action-optional report tells an arm64 guest: a recoverable
    /// record through the GSIV source.
    pub(super) const ACTION_OPTIONAL: Told = Told::Ghes {
        source: Notification::Gsiv,
        severity: Severity::Recoverable,
    };
    /// Forgets the SEA source's waits: the vCPUs that waited are gone.
    pub(super) fn reset_arch(&self) {
        lock(&self.setup.waits).clear();
    }

    /// arm64 has no machine-check capability register.
    pub fn mcg_cap(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Why this VM cannot report memory errors recoverably, if it cannot.
    pub fn ras_limitation(&self) -> Option<String> {
        if self.ghes.is_none() {
            return Some(
                "the guest has no APEI error sources (a device-tree boot: --tables dt)".into(),
            );
        }
        (!self.setup.sea).then(|| {
            "KVM cannot inject external data aborts (no KVM_CAP_ARM_INJECT_EXT_DABT): \
             consumed poison cannot be reported synchronously"
                .into()
        })
    }

    /// Writes a recoverable record for `gpa` into the SEA source; busy if
    /// the previous one is not acknowledged yet.
    fn sea_record(&self, gpa: u64) -> Result<bool, RasError> {
        let ghes = self
            .ghes
            .as_ref()
            .ok_or(crate::ghes_sources::Error::NoSources)?;
        let written = lock(ghes).memory_error_now(Notification::Sea, Severity::Recoverable, gpa)?;
        Ok(written.is_some_and(|r| r.submitted == Submitted::Written))
    }

    /// Injects a named memory error: `srar` is an SEA with its record on
    /// `vcpu`, `srao` a recoverable record through the GSIV source.
    pub fn inject(&self, inj: &Injection, received: Instant) -> Result<RasEvent, RasError> {
        self.check_gpa(inj.gpa)?;
        self.check_vcpu(inj.vcpu)?;
        let source = match inj.error {
            MemoryError::Srar => {
                if !self.setup.sea {
                    return Err(RasError::Guest(sea::Error::Unsupported));
                }
                if !self.sea_record(inj.gpa)? {
                    return Err(RasError::Unsupported(
                        "the SEA error source still holds an unacknowledged record; \
                         an SEA cannot be raised without its own record",
                    ));
                }
                let senders = self.senders();
                let sender = senders
                    .get(usize::from(inj.vcpu))
                    .ok_or(RasError::NoVcpu(inj.vcpu, self.vcpu_count()))?;
                let (reply, rx) = channel();
                if !sender.send(on_vcpu(inj.vcpu, reply)) {
                    return Err(RasError::VcpuGone(inj.vcpu));
                }
                vcpu_answer(&rx).ok_or(RasError::VcpuGone(inj.vcpu))??;
                Notification::Sea
            }
            MemoryError::Srao => {
                self.ghes_memory_error(&GhesInjection {
                    source: Notification::Gsiv,
                    severity: Severity::Recoverable,
                    gpa: inj.gpa,
                    threshold_exceeded: false,
                    vcpu: inj.vcpu,
                })?;
                Notification::Gsiv
            }
            MemoryError::Ucna => {
                return Err(RasError::Unsupported(
                    "ucna is an x86 machine-check class; on arm64 report a corrected or \
                     recoverable record with ghes:<source>",
                ))
            }
        };
        let vmm_us = micros(received);
        if source == Notification::Sea {
            // The SRAO record told the guest already (ghes_memory_error).
            self.reported(inj.gpa, Told::Sea);
        }
        Ok(self.injected(inj, false, vmm_us, Some(source)))
    }

    /// Raw machine-check records are x86's.
    pub fn inject_record(
        &self,
        _vcpu: u8,
        _record: &MceRecord,
        _received: Instant,
    ) -> Result<RasEvent, RasError> {
        Err(RasError::Unsupported(
            "raw machine-check records are x86's; on arm64 send a raw CPER record (ghes-raw)",
        ))
    }

    /// Tells the guest, from vCPU `index`'s own thread, that its access hit
    /// the poisoned `page`: a recoverable record in the SEA source, then the
    /// SEA itself, taken before the access is retried. A host's early
    /// warning (`srao`) becomes a record through the GSIV source.
    pub(super) fn report_consumption(
        &self,
        index: u8,
        fd: &VcpuFd,
        page: u64,
        error: MemoryError,
    ) -> Consumption {
        if error != MemoryError::Srar {
            let r = self.ghes_memory_error(&GhesInjection {
                source: Notification::Gsiv,
                severity: Severity::Recoverable,
                gpa: page,
                threshold_exceeded: false,
                vcpu: index,
            });
            return Consumption::Reported {
                told: r.is_ok().then_some(Told::Ghes {
                    source: Notification::Gsiv,
                    severity: Severity::Recoverable,
                }),
                error: r.err().map(|e| e.to_string()),
                ghes: Some(Notification::Gsiv),
            };
        }
        if !self.setup.sea {
            return Consumption::Reported {
                error: Some(sea::Error::Unsupported.to_string()),
                ghes: None,
                told: None,
            };
        }
        let mut ghes = None;
        let note = match self.sea_record(page) {
            Ok(true) => {
                ghes = Some(Notification::Sea);
                lock(&self.setup.waits).remove(&page);
                None
            }
            Ok(false) => {
                // Another vCPU's SEA record is not acknowledged yet: retry
                // the access shortly, for a bounded time.
                let first = *lock(&self.setup.waits)
                    .entry(page)
                    .or_insert_with(Instant::now);
                if first.elapsed() < SEA_BUSY_LIMIT {
                    return Consumption::Retry;
                }
                lock(&self.setup.waits).remove(&page);
                Some(format!(
                    "the SEA source stayed busy for {} ms: SEA raised without a record",
                    SEA_BUSY_LIMIT.as_millis()
                ))
            }
            Err(e) => Some(e.to_string()),
        };
        let raised = sea::inject(fd, index).err().map(|e| e.to_string());
        Consumption::Reported {
            told: raised.is_none().then_some(Told::Sea),
            error: raised.or(note),
            ghes,
        }
    }
}
