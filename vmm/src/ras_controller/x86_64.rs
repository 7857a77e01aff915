//! Memory errors on x86: machine checks. A named error or a raw record is
//! planned by [`ras::mce::plan`] (which vCPUs get which record) and
//! delivered to the vCPUs, which check and inject it on their own threads
//! (arch::x86_64::mce); a consumed sticky page becomes an SRAR on the
//! accessing vCPU.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use arch::x86_64::mce as kvm;
use kvm_ioctls::VcpuFd;
use ras::ledger::Told;
use ras::mce::{self, MceRecord, MemoryError, Planned};

use super::consumption::Consumption;
use super::{micros, vcpu_answer, Injection, RasController, RasError};
use crate::event::RasEvent;
use crate::vcpu::VcpuRequest;

/// Checks `record` on the vCPU's own thread and injects it unless
/// `check_only`; the answer goes to `reply`. With `in_flight_error`, an
/// injection while the vCPU is delivering another event is refused with
/// [`kvm::Error::EventInFlight`] (see [`kvm::event_in_flight`]), for the
/// sender to ask again once the guest has run.
fn on_vcpu(
    index: u8,
    mcg_cap: u64,
    record: MceRecord,
    check_only: bool,
    in_flight_error: bool,
    reply: Sender<Result<(), kvm::Error>>,
) -> VcpuRequest {
    VcpuRequest::OnThread(Box::new(move |fd| {
        let mut r = kvm::check(fd, index, mcg_cap, &record);
        if r.is_ok() && !check_only {
            r = match kvm::event_in_flight(fd).filter(|_| in_flight_error) {
                Some(what) => Err(kvm::Error::EventInFlight(index, what)),
                None => kvm::inject(fd, index, &record),
            };
        }
        let _ = reply.send(r);
        None
    }))
}

/// How often, and how far apart, an injection is asked again while its
/// vCPU is delivering another event (each time the guest runs between).
const IN_FLIGHT_TRIES: u32 = 500;
const IN_FLIGHT_PAUSE: Duration = Duration::from_micros(200);

impl RasController {
    /// What an action-optional report tells an x86 guest.
    pub(super) const ACTION_OPTIONAL: Told = Told::MachineCheck(MemoryError::Srao);
    /// Nothing of x86's machine-check set-up belongs to one boot.
    pub(super) fn reset_arch(&self) {}

    /// The guest's MCG_CAP and the bits of it rasvmm supplies.
    pub fn mcg_cap(&self) -> (u64, u64) {
        (self.setup.mcg_cap, self.setup.mcg_cap_supplied)
    }

    /// Why this VM cannot report memory errors recoverably, if it cannot.
    pub fn ras_limitation(&self) -> Option<String> {
        if self.setup.mcg_cap == 0 {
            return Some("KVM offers no machine-check banks".into());
        }
        (!mce::recoverable(self.setup.vendor, self.setup.mcg_cap)).then(|| {
            let why = match &self.setup.supply_error {
                Some(e) => format!("KVM dropped SER_P and {e}"),
                None => "KVM does not offer SER_P".to_string(),
            };
            format!(
                "the guest's MCG_CAP lacks SER_P ({why}), so an Intel-profile guest cannot \
                 grade SRAR/SRAO; consumed poison is reported as unrecoverable (use --cpu amd)"
            )
        })
    }

    /// Injects a named memory error, checking every target vCPU first.
    pub fn inject(&self, inj: &Injection, received: Instant) -> Result<RasEvent, RasError> {
        self.check_gpa(inj.gpa)?;
        self.check_vcpu(inj.vcpu)?;
        if self.setup.mcg_cap == 0 {
            return Err(RasError::NoMce);
        }
        if inj.local && self.setup.mcg_cap & mce::MCG_LMCE_P == 0 {
            return Err(RasError::NoLmce);
        }
        let record = mce::encode(inj.error, self.setup.vendor, inj.gpa, inj.local);
        let broadcast = self.deliver_record(inj.vcpu, &record)?;
        let vmm_us = micros(received);
        self.reported(inj.gpa, Told::MachineCheck(inj.error));
        Ok(self.injected(inj, broadcast, vmm_us, None))
    }

    /// Injects a raw record on `vcpu` (and its broadcast companions, by the
    /// one rule in [`mce::plan`]) after validating it against MCG_CAP.
    pub fn inject_record(
        &self,
        vcpu: u8,
        record: &MceRecord,
        received: Instant,
    ) -> Result<RasEvent, RasError> {
        let broadcast = self.deliver_record(vcpu, record)?;
        Ok(RasEvent::InjectedRaw {
            record: *record,
            vcpu,
            broadcast,
            at_ms: self.now_ms(),
            vmm_us: micros(received),
        })
    }

    /// Validates, plans and delivers `record`; whether it was broadcast.
    fn deliver_record(&self, vcpu: u8, record: &MceRecord) -> Result<bool, RasError> {
        self.check_vcpu(vcpu)?;
        if self.setup.mcg_cap == 0 {
            return Err(RasError::NoMce);
        }
        mce::validate(record, self.setup.mcg_cap)?;
        let plan = mce::plan(*record, self.setup.vendor, vcpu, self.vcpu_count());
        self.deliver(&plan, None)?;
        Ok(plan.len() > 1)
    }

    /// Delivers a plan's records.
    ///
    /// From any thread but a vCPU's (`own` is `None`), in two phases: every
    /// target vCPU checks its record first (CR4.MCE, MCIP, enabled banks),
    /// and only if all accept is anything injected, so a refusal leaves the
    /// guest untouched; a single target checks and injects in one request.
    /// From vCPU `own`'s own thread (a consumption), its record is checked
    /// and injected right there, before the access is retried, and the
    /// other vCPUs' records are sent without waiting: two vCPUs consuming
    /// poison at once must not wait on each other. A refusal by a peer then
    /// shows in the guest's own log (its rendezvous times out).
    pub fn deliver(&self, plan: &[Planned], own: Option<(u8, &VcpuFd)>) -> Result<(), RasError> {
        let mcg_cap = self.setup.mcg_cap;
        if let Some((index, fd)) = own {
            for p in plan.iter().filter(|p| p.vcpu == index) {
                kvm::check(fd, index, mcg_cap, &p.record)?;
                kvm::inject(fd, index, &p.record)?;
            }
            for p in plan.iter().filter(|p| p.vcpu != index) {
                if let Some(s) = self.senders().get(usize::from(p.vcpu)) {
                    let (reply, _) = channel();
                    // Fire and forget: a peer that is delivering an event
                    // still gets its record (no one would ask again).
                    s.send(on_vcpu(p.vcpu, mcg_cap, p.record, false, false, reply));
                }
            }
            return Ok(());
        }
        let phases: &[bool] = if plan.len() == 1 {
            &[false]
        } else {
            &[true, false]
        };
        let senders = self.senders();
        for &check_only in phases {
            let mut todo: Vec<&Planned> = plan.iter().collect();
            for attempt in 1..=IN_FLIGHT_TRIES {
                let mut replies: Vec<(&Planned, Receiver<Result<(), kvm::Error>>)> = Vec::new();
                for p in todo {
                    let sender = senders
                        .get(usize::from(p.vcpu))
                        .ok_or(RasError::NoVcpu(p.vcpu, self.vcpu_count()))?;
                    let (reply, rx) = channel();
                    if !sender.send(on_vcpu(p.vcpu, mcg_cap, p.record, check_only, true, reply)) {
                        return Err(RasError::VcpuGone(p.vcpu));
                    }
                    replies.push((p, rx));
                }
                todo = Vec::new();
                for (p, rx) in replies {
                    match vcpu_answer(&rx) {
                        None => return Err(RasError::VcpuGone(p.vcpu)),
                        Some(Err(kvm::Error::EventInFlight(..))) if attempt < IN_FLIGHT_TRIES => {
                            todo.push(p)
                        }
                        Some(r) => r?,
                    }
                }
                if todo.is_empty() {
                    break;
                }
                std::thread::sleep(IN_FLIGHT_PAUSE);
            }
        }
        Ok(())
    }

    /// Tells the guest, from vCPU `index`'s own thread, that its access hit
    /// the poisoned `page` (SRAR) or that the host found the page bad
    /// (SRAO): a machine check, or nothing for a guest that cannot take it.
    pub(super) fn report_consumption(
        &self,
        index: u8,
        fd: &VcpuFd,
        page: u64,
        error: MemoryError,
    ) -> Consumption {
        let (vendor, mcg_cap) = (self.setup.vendor, self.setup.mcg_cap);
        let lmce = mcg_cap & mce::MCG_LMCE_P != 0;
        let record = if mce::recoverable(vendor, mcg_cap) {
            Some((
                mce::encode(error, vendor, page, lmce),
                Told::MachineCheck(error),
            ))
        } else if error == MemoryError::Srar {
            // What a CPU without SER reports; the guest panics, as it would on
            // such hardware, instead of retrying the access forever.
            Some((mce::encode_unrecoverable(page), Told::Unrecoverable))
        } else {
            // Action-optional news a non-SER guest cannot take: the page
            // stays poisoned and the next access reports it.
            None
        };
        if let Some((r, _)) = &record {
            // A machine check the CPU cannot take shuts it down (SDM 15.10.2;
            // APM 9.3.1): CR4.MCE clear (the decompressor, early boot of a
            // kernel that does not know the page is bad), or MCIP still set.
            if let Err(e @ (kvm::Error::Cr4McClear(_) | kvm::Error::McipSet(_))) =
                kvm::check(fd, index, mcg_cap, r)
            {
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                let why = match e {
                    kvm::Error::Cr4McClear(_) => "CR4.MCE is clear",
                    _ => "MCG_STATUS.MCIP is set",
                };
                return Consumption::Shutdown(format!(
                    "consumed poisoned guest page {page:#x} at RIP {rip:#x} while {why}: \
                     a machine check it cannot take shuts the CPU down"
                ));
            }
        }
        let (error, told) = match record {
            Some((r, told)) => {
                let plan = mce::plan(r, vendor, index, self.vcpu_count().max(index + 1));
                match self.deliver(&plan, Some((index, fd))) {
                    Ok(()) => (None, Some(told)),
                    Err(e) => (Some(e.to_string()), None),
                }
            }
            None => (Some("not reported: the guest has no SER_P".into()), None),
        };
        Consumption::Reported {
            error,
            ghes: None,
            told,
        }
    }
}
