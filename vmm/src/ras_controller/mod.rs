//! The one place memory errors are reported to the guest from.
//!
//! [`RasController`] owns the poison ledger, the GHES error sources and the
//! vCPUs' request handles. Every memory error, whoever found it (a step, an
//! API client, a vCPU whose access hit hwpoisoned host memory), is planned
//! here by the pure rules of the ras crate ([`ras::mce::plan`]: which record
//! on which vCPU) and delivered by [`RasController::deliver`]; a vCPU thread
//! only performs its own ioctl. The controller is shared (`Arc`) by the
//! session and the vCPU threads; its state sits behind short-held mutexes.

use std::ops::Range;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use arch::x86_64::mce as kvm;
use devices::bus::lock;
use kvm_ioctls::VcpuFd;
use ras::cper::Severity;
use ras::ghes::{Notification, Submitted};
use ras::ledger::{self, Ledger};
use ras::mce::{self, MceRecord, MemoryError, Planned, Vendor};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::PoisonReport;
use crate::event::RasEvent;
use crate::ghes_sources::{self, Ghes};
use crate::kho_observer::{self, KhoView};
use crate::vcpu::{self, VcpuRequest, VcpuSender};

mod consumption;

/// Microseconds since `t`.
fn micros(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// How long a vCPU may take to answer an injection request.
const VCPU_ANSWER: Duration = Duration::from_secs(5);

/// Why a RAS request was refused. Nothing is injected or poisoned when a
/// request is refused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RasError {
    /// The address is not guest RAM.
    #[error("Guest-physical address {0:#x} is not in guest RAM")]
    NotRam(u64),
    /// A page was meant but the address is not page-aligned.
    #[error("Guest-physical address {0:#x} is not page-aligned")]
    Unaligned(u64),
    /// No such vCPU.
    #[error("vCPU {0} does not exist (the VM has {1})")]
    NoVcpu(u8, u8),
    /// KVM offers no machine checks.
    #[error("This KVM offers no machine-check support (KVM_X86_GET_MCE_CAP_SUPPORTED is 0)")]
    NoMce,
    /// LMCE asked for but not offered.
    #[error("Local machine checks need LMCE, which this KVM does not offer (it is VMX-only)")]
    NoLmce,
    /// A raw record that does not validate.
    #[error("Invalid machine-check record: {0}")]
    Record(#[from] mce::Error),
    /// The guest state refuses it (CR4.MCE, MCIP, disabled banks).
    #[error("{0}")]
    Guest(#[from] kvm::Error),
    /// A vCPU did not answer.
    #[error("vCPU {0} is not running")]
    VcpuGone(u8),
    /// The ledger is full.
    #[error("{0}")]
    Ledger(#[from] ledger::Error),
    /// The page holds rasvmm's firmware tables or error status blocks.
    #[error("Guest-physical address {0:#x} holds rasvmm's ACPI tables or GHES error status blocks and cannot be poisoned")]
    Firmware(u64),
    /// A GHES report was refused.
    #[error("{0}")]
    Ghes(#[from] ghes_sources::Error),
    /// The host refused to poison the page.
    #[error("Cannot poison guest page {gpa:#x}: {reason}")]
    Poison {
        /// The page.
        gpa: u64,
        /// Why.
        reason: String,
    },
}

/// A machine-check injection request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    /// What to report.
    pub error: MemoryError,
    /// Guest-physical address.
    pub gpa: u64,
    /// vCPU that gets the error.
    pub vcpu: u8,
    /// Deliver to `vcpu` only (LMCE) instead of broadcasting; needs LMCE_P.
    pub local: bool,
}

/// A GHES memory-error report request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GhesInjection {
    /// The error source (its notification).
    pub source: Notification,
    /// CPER severity.
    pub severity: Severity,
    /// Guest-physical address.
    pub gpa: u64,
    /// Corrected errors: the error threshold was exceeded (soft offline).
    pub threshold_exceeded: bool,
    /// vCPU that takes the NMI, for the NMI source.
    pub vcpu: u8,
}

/// What the machine-check side of the VM is: fixed before any vCPU runs.
#[derive(Debug, Clone)]
pub struct McaSetup {
    /// The vCPUs' MCG_CAP as the guest sees it (0 without machine checks).
    pub mcg_cap: u64,
    /// Bits of it rasvmm supplies by answering the guest's reads.
    pub mcg_cap_supplied: u64,
    /// Why rasvmm could not supply bits KVM dropped, if it could not.
    pub supply_error: Option<String>,
    /// The guest's CPU vendor, for encodings.
    pub vendor: Vendor,
}

/// The RAS side of one VM.
pub struct RasController {
    memory: GuestMemoryMmap,
    mca: McaSetup,
    ledger: Mutex<Ledger>,
    ghes: Option<Mutex<Ghes>>,
    poison_report: PoisonReport,
    firmware: Range<u64>,
    vcpus: OnceLock<Vec<VcpuSender>>,
    started: Instant,
}

impl RasController {
    /// A controller for a VM with `memory`; `firmware` is the guest range
    /// rasvmm itself reads and writes (never poisoned).
    pub fn new(
        memory: GuestMemoryMmap,
        mca: McaSetup,
        ghes: Option<Ghes>,
        poison_report: PoisonReport,
        firmware: Range<u64>,
        started: Instant,
    ) -> Self {
        Self {
            memory,
            mca,
            ledger: Mutex::new(Ledger::new()),
            ghes: ghes.map(Mutex::new),
            poison_report,
            firmware,
            vcpus: OnceLock::new(),
            started,
        }
    }

    /// Hands the controller the vCPUs' request handles, once, before any
    /// vCPU runs.
    pub fn set_vcpus(&self, senders: Vec<VcpuSender>) {
        let _ = self.vcpus.set(senders);
    }

    fn senders(&self) -> &[VcpuSender] {
        self.vcpus.get().map(Vec::as_slice).unwrap_or_default()
    }

    fn vcpu_count(&self) -> u8 {
        u8::try_from(self.senders().len()).unwrap_or(u8::MAX)
    }

    /// The machine-check set-up.
    pub fn mca(&self) -> &McaSetup {
        &self.mca
    }

    /// Milliseconds since the VMM started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Why this VM cannot report memory errors recoverably, if it cannot.
    pub fn ras_limitation(&self) -> Option<String> {
        if self.mca.mcg_cap == 0 {
            return Some("KVM offers no machine-check banks".into());
        }
        (!mce::recoverable(self.mca.vendor, self.mca.mcg_cap)).then(|| {
            let why = match &self.mca.supply_error {
                Some(e) => format!("KVM dropped SER_P and {e}"),
                None => "KVM does not offer SER_P".to_string(),
            };
            format!(
                "the guest's MCG_CAP lacks SER_P ({why}), so an Intel-profile guest cannot \
                 grade SRAR/SRAO; consumed poison is reported as unrecoverable (use --cpu amd)"
            )
        })
    }

    /// The poisoned pages.
    pub fn ledger(&self) -> Vec<ledger::Entry> {
        lock(&self.ledger).entries()
    }

    /// How many pages the ledger holds.
    pub fn poisoned_pages(&self) -> usize {
        lock(&self.ledger).len()
    }

    fn check_gpa(&self, gpa: u64) -> Result<(), RasError> {
        if self.memory.address_in_range(GuestAddress(gpa)) {
            Ok(())
        } else {
            Err(RasError::NotRam(gpa))
        }
    }

    fn check_vcpu(&self, vcpu: u8) -> Result<(), RasError> {
        let count = self.vcpu_count();
        if vcpu >= count {
            return Err(RasError::NoVcpu(vcpu, count));
        }
        Ok(())
    }

    /// Injects a named memory error, checking every target vCPU first.
    pub fn inject(&self, inj: &Injection) -> Result<RasEvent, RasError> {
        let received = Instant::now();
        self.check_gpa(inj.gpa)?;
        self.check_vcpu(inj.vcpu)?;
        if self.mca.mcg_cap == 0 {
            return Err(RasError::NoMce);
        }
        if inj.local && self.mca.mcg_cap & mce::MCG_LMCE_P == 0 {
            return Err(RasError::NoLmce);
        }
        let record = mce::encode(inj.error, self.mca.vendor, inj.gpa, inj.local);
        let broadcast = self.deliver_record(inj.vcpu, &record)?;
        let vmm_us = micros(received);
        self.reported(inj.gpa);
        Ok(RasEvent::Injected {
            error: inj.error,
            gpa: inj.gpa,
            vcpu: inj.vcpu,
            broadcast,
            at_ms: self.now_ms(),
            vmm_us,
            refused: None,
        })
    }

    /// Injects a raw record on `vcpu` (and its broadcast companions, by the
    /// one rule in [`mce::plan`]) after validating it against MCG_CAP.
    pub fn inject_record(&self, vcpu: u8, record: &MceRecord) -> Result<RasEvent, RasError> {
        let received = Instant::now();
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
        if self.mca.mcg_cap == 0 {
            return Err(RasError::NoMce);
        }
        mce::validate(record, self.mca.mcg_cap)?;
        let plan = mce::plan(*record, self.mca.vendor, vcpu, self.vcpu_count());
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
        let mcg_cap = self.mca.mcg_cap;
        if let Some((index, fd)) = own {
            for p in plan.iter().filter(|p| p.vcpu == index) {
                kvm::check(fd, index, mcg_cap, &p.record)?;
                kvm::inject(fd, index, &p.record)?;
            }
            for p in plan.iter().filter(|p| p.vcpu != index) {
                if let Some(s) = self.senders().get(usize::from(p.vcpu)) {
                    let (reply, _) = channel();
                    s.send(VcpuRequest::Mce {
                        record: p.record,
                        check_only: false,
                        reply,
                    });
                }
            }
            return Ok(());
        }
        let phases: &[bool] = if plan.len() == 1 {
            &[false]
        } else {
            &[true, false]
        };
        for &check_only in phases {
            let mut replies: Vec<(u8, Receiver<Result<(), kvm::Error>>)> = Vec::new();
            for p in plan {
                let sender = self
                    .senders()
                    .get(usize::from(p.vcpu))
                    .ok_or(RasError::NoVcpu(p.vcpu, self.vcpu_count()))?;
                let (reply, rx) = channel();
                if !sender.send(VcpuRequest::Mce {
                    record: p.record,
                    check_only,
                    reply,
                }) {
                    return Err(RasError::VcpuGone(p.vcpu));
                }
                replies.push((p.vcpu, rx));
            }
            for (i, rx) in replies {
                rx.recv_timeout(VCPU_ANSWER)
                    .map_err(|_| RasError::VcpuGone(i))??;
            }
        }
        Ok(())
    }

    /// Makes the guest page at `gpa` bad like failed DRAM: rasvmm's own
    /// mapping of it is hwpoisoned on the host (madvise MADV_HWPOISON), so
    /// every later guest access, from any instruction, stops in KVM before it
    /// executes and comes back to the vCPU thread as SIGBUS BUS_MCEERR_AR,
    /// which [`RasController::consumed`] turns into a synchronous error.
    pub fn poison(&self, gpa: u64) -> Result<RasEvent, RasError> {
        self.check_gpa(gpa)?;
        if !gpa.is_multiple_of(ledger::PAGE_SIZE) {
            return Err(RasError::Unaligned(gpa));
        }
        if self.firmware.contains(&gpa) {
            // rasvmm itself reads and writes these pages.
            return Err(RasError::Firmware(gpa));
        }
        let poisoned = RasEvent::Poisoned {
            gpa,
            at_ms: self.now_ms(),
        };
        if lock(&self.ledger).is_sticky(gpa) {
            return Ok(poisoned);
        }
        let hva = self
            .memory
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| RasError::NotRam(gpa))?;
        // A page the guest never touched is backed by nothing (or the shared
        // zero page), which the host cannot poison (EBUSY): give it its own
        // frame first. MADV_POPULATE_WRITE keeps the contents.
        // SAFETY: as below; populating a page of our own mapping.
        unsafe { libc::madvise(hva.cast(), 4096, libc::MADV_POPULATE_WRITE) };
        let (r, err) = vcpu::expecting_sigbus(|| {
            // SAFETY: `hva` is the start of a page of rasvmm's guest mapping;
            // MADV_HWPOISON unmaps it and marks the backing frame poisoned,
            // which is the point. Nothing in rasvmm holds a reference into
            // the page.
            let r = unsafe { libc::madvise(hva.cast(), 4096, libc::MADV_HWPOISON) };
            (r, std::io::Error::last_os_error())
        });
        // memory_failure() signals the caller of madvise (BUS_MCEERR_AR for
        // the page just poisoned); that is the poisoning itself, not a fault.
        let _ = vcpu::take_host_memory_error();
        if r != 0 {
            let reason = match err.raw_os_error() {
                Some(libc::EPERM) => "MADV_HWPOISON needs CAP_SYS_ADMIN".to_string(),
                Some(libc::EINVAL) => {
                    "the host kernel cannot poison pages (no CONFIG_MEMORY_FAILURE)".to_string()
                }
                _ => err.to_string(),
            };
            return Err(RasError::Poison { gpa, reason });
        }
        lock(&self.ledger).poison(gpa, ledger::Source::Injected, self.now_ms())?;
        Ok(poisoned)
    }

    /// Notes in the ledger that the guest was told the page at `gpa` is bad.
    fn reported(&self, gpa: u64) {
        let _ = lock(&self.ledger).poison(gpa, ledger::Source::Reported, self.now_ms());
    }

    /// Reports a memory error through a GHES error source.
    pub fn ghes_memory_error(&self, inj: &GhesInjection) -> Result<RasEvent, RasError> {
        self.check_gpa(inj.gpa)?;
        let record = ras::cper::MemoryErrorRecord {
            severity: inj.severity,
            physical_addr: inj.gpa,
            threshold_exceeded: inj.threshold_exceeded,
        }
        .encode();
        let e = self.ghes_raw(inj.source, record, inj.vcpu)?;
        // A page the guest will count as poisoned (memory_failure or soft
        // offline; a fatal record panics it).
        if inj.severity != Severity::Corrected || inj.threshold_exceeded {
            self.reported(inj.gpa);
        }
        Ok(e)
    }

    /// Reports a raw CPER record through a GHES error source, validated
    /// first: a refused record leaves guest memory untouched.
    pub fn ghes_raw(
        &self,
        source: Notification,
        record: Vec<u8>,
        vcpu: u8,
    ) -> Result<RasEvent, RasError> {
        self.check_vcpu(vcpu)?;
        let ghes = self.ghes.as_ref().ok_or(ghes_sources::Error::NoSources)?;
        let report = lock(ghes).raw(source, record)?;
        if report.submitted == Submitted::Written {
            self.ghes_notify(source, vcpu, None);
        }
        Ok(RasEvent::GhesReported {
            source,
            severity: report.summary.severity,
            gpa: report.summary.sections.iter().find_map(|s| s.physical_addr),
            submitted: report.submitted,
            at_ms: self.now_ms(),
        })
    }

    /// Writes records that waited for an acknowledgement and notifies the
    /// guest; returns whether records still wait.
    pub fn ghes_pump(&self) -> bool {
        let Some(g) = &self.ghes else {
            return false;
        };
        let (notify, waiting) = {
            let mut g = lock(g);
            (g.pump(), g.waiting())
        };
        for n in notify {
            self.ghes_notify(n, 0, None);
        }
        waiting
    }

    /// The GHES sources' counters.
    pub fn ghes_state(&self) -> Vec<ghes_sources::SourceState> {
        self.ghes
            .as_ref()
            .map(|g| lock(g).stats())
            .unwrap_or_default()
    }

    /// Tells the guest a record is in `source`'s block. An NMI for the
    /// calling vCPU's own thread (`own`) is raised right there.
    fn ghes_notify(&self, source: Notification, vcpu: u8, own: Option<&VcpuFd>) -> Option<String> {
        match source {
            Notification::Nmi => match own {
                Some(fd) => fd.nmi().err().map(|e| e.to_string()),
                None => {
                    if let Some(s) = self.senders().get(usize::from(vcpu)) {
                        s.send(VcpuRequest::Nmi);
                    }
                    None
                }
            },
            Notification::Gsiv => {
                if let Some(g) = &self.ghes {
                    lock(g).notify_gsiv();
                }
                None
            }
            Notification::Polled => None,
            // arm64's SEA is raised by the arm64 vCPU code; x86 guests have
            // no SEA source (ras::ghes::Notification::X86_64).
            Notification::Sea => Some("SEA notifications need an arm64 guest".to_string()),
        }
    }

    /// The guest's own poison list, from its KHO state, against the ledger.
    pub fn kho_view(&self) -> KhoView {
        let entries = self.ledger();
        let ledger: Vec<u64> = entries.iter().map(|e| e.gpa).collect();
        // Sticky pages fault on any access, the VMM's own included.
        let sticky: std::collections::BTreeSet<u64> = entries
            .iter()
            .filter(|e| e.source.is_sticky())
            .map(|e| e.gpa)
            .collect();
        kho_observer::observe(&self.memory, &ledger, &sticky)
    }

    /// The guest-physical address backed by host address `hva`.
    pub fn gpa_of(&self, hva: usize) -> Option<u64> {
        self.memory.iter().find_map(|r| {
            let start = r.as_ptr() as usize;
            let len = usize::try_from(r.len()).ok()?;
            (hva >= start && hva - start < len).then(|| r.start_addr().0 + (hva - start) as u64)
        })
    }
}
