//! The one place memory errors are reported to the guest from.
//!
//! [`RasController`] owns the poison ledger, the GHES error sources and the
//! vCPUs' request handles. Every memory error, whoever found it (a step, an
//! API client, a vCPU whose access hit hwpoisoned host memory), is planned
//! here by the pure rules of the ras crate ([`ras::mce::plan`]: which record
//! on which vCPU) and delivered by [`RasController::deliver`]; a vCPU thread
//! only performs its own ioctl. The controller is shared (`Arc`) by the
//! session and the vCPU threads; its state sits behind short-held mutexes.
//! The ledger lives as long as the guest memory; the vCPUs' handles, the
//! GHES sources and the firmware range belong to one boot and are replaced
//! when the machine is rebuilt after a guest reset (the `reset` module).

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use guest_agent::GuestPoisonOp;
use kvm_ioctls::VcpuFd;
use ras::cper::Severity;
use ras::ghes::{Notification, Submitted};
use ras::ledger::{self, Ledger, Told};
use ras::mce::{self, MemoryError};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::PoisonReport;
use crate::event::RasEvent;
use crate::ghes_sources::{self, Ghes};
use crate::kho_observer::corrupt::KhoCorrupted;
use crate::kho_observer::{self, KhoTracker, KhoView};
use crate::machine::{self, RasSetup};
use crate::vcpu::{self, VcpuRequest, VcpuSender};

pub use einj::EinjAnswer;
pub use host::HostReport;

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod consumption;
mod einj;
mod host;
mod reset;
#[cfg(target_arch = "x86_64")]
mod x86_64;

/// Microseconds since `t`.
fn micros(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// How long a vCPU may take to answer an injection request.
const VCPU_ANSWER: Duration = Duration::from_secs(5);

/// How long the requester spins for a vCPU's answer before it sleeps. A
/// kicked vCPU usually answers within 20-60 us (exit, checks, one or two
/// ioctls); sleeping adds a wake-up of the requesting thread to every
/// injection (about 25 us at the median on this project's CI machines, 40
/// at the 99th percentile; docs/benchmarks.md).
const VCPU_ANSWER_SPIN: Duration = Duration::from_micros(150);

/// A vCPU's answer on `rx`: spun for briefly, then waited for up to
/// [`VCPU_ANSWER`]; `None` if it never came (the vCPU thread is gone or
/// stuck).
fn vcpu_answer<T>(rx: &std::sync::mpsc::Receiver<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
            Err(std::sync::mpsc::TryRecvError::Empty) if start.elapsed() < VCPU_ANSWER_SPIN => {
                std::hint::spin_loop()
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => break,
        }
    }
    rx.recv_timeout(VCPU_ANSWER).ok()
}

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
    /// The vCPU refuses it (x86: CR4.MCE, MCIP, disabled banks).
    #[error("{0}")]
    Guest(#[from] machine::DeliveryError),
    /// The request has no meaning on this architecture.
    #[error("{0}")]
    Unsupported(&'static str),
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
    /// The page's host memory is already poisoned.
    #[error("Guest page {0:#x} is already bad (its host memory is poisoned)")]
    AlreadyBad(u64),
    /// The host refused to poison the page.
    #[error("Cannot poison guest page {gpa:#x}: {reason}")]
    Poison {
        /// The page.
        gpa: u64,
        /// Why.
        reason: String,
    },
    /// A poisoned page cannot be replaced by fresh memory at a reset.
    #[error("Cannot replace poisoned guest page {gpa:#x} with fresh memory: {reason}")]
    Remap {
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

/// The RAS side of one VM.
pub struct RasController {
    memory: GuestMemoryMmap,
    /// The first boot's: the same KVM and configuration give every boot
    /// the same.
    setup: RasSetup,
    ledger: Mutex<Ledger>,
    /// The current boot's sources (replaced at each boot, whose tables
    /// describe them).
    ghes: Option<Mutex<Ghes>>,
    poison_report: PoisonReport,
    /// The current boot's firmware range.
    firmware: Mutex<Range<u64>>,
    /// The current boot's vCPUs (replaced at each boot).
    vcpus: Mutex<Arc<[VcpuSender]>>,
    /// Pages a reset replaced with fresh memory: a host report for one that
    /// comes later may name the frame that was under it before.
    remapped: Mutex<std::collections::BTreeSet<u64>>,
    started: Instant,
}

impl RasController {
    /// A controller for a VM with `memory`; `firmware` is the guest range
    /// rasvmm itself reads and writes (never poisoned).
    pub fn new(
        memory: GuestMemoryMmap,
        setup: RasSetup,
        ghes: Option<Ghes>,
        poison_report: PoisonReport,
        firmware: Range<u64>,
        started: Instant,
    ) -> Self {
        Self {
            memory,
            setup,
            ledger: Mutex::new(Ledger::new()),
            ghes: ghes.map(Mutex::new),
            poison_report,
            firmware: Mutex::new(firmware),
            vcpus: Mutex::new(Arc::from(Vec::new())),
            remapped: Mutex::default(),
            started,
        }
    }

    /// Hands the controller the vCPUs' request handles before any vCPU of
    /// a boot runs (each boot's replace the last's).
    pub fn set_vcpus(&self, senders: Vec<VcpuSender>) {
        *lock(&self.vcpus) = Arc::from(senders);
    }

    fn senders(&self) -> Arc<[VcpuSender]> {
        lock(&self.vcpus).clone()
    }

    fn vcpu_count(&self) -> u8 {
        u8::try_from(self.senders().len()).unwrap_or(u8::MAX)
    }

    /// Milliseconds since the VMM started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The event for an injection carried out (both architectures').
    fn injected(
        &self,
        inj: &Injection,
        broadcast: bool,
        vmm_us: u64,
        ghes: Option<Notification>,
    ) -> RasEvent {
        RasEvent::Injected {
            error: inj.error,
            gpa: inj.gpa,
            vcpu: inj.vcpu,
            broadcast,
            at_ms: self.now_ms(),
            vmm_us,
            refused: None,
            ghes,
        }
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

    /// Makes the guest page at `gpa` bad like failed DRAM: rasvmm's own
    /// mapping of it is hwpoisoned on the host (madvise MADV_HWPOISON), so
    /// every later guest access, from any instruction, stops in KVM before it
    /// executes and comes back to the vCPU thread as SIGBUS BUS_MCEERR_AR,
    /// which [`RasController::consumed`] turns into a synchronous error.
    pub fn poison(&self, gpa: u64) -> Result<RasEvent, RasError> {
        self.make_bad(gpa, ledger::Source::Injected)
    }

    /// [`RasController::poison`], with the ledger naming `source`.
    fn make_bad(&self, gpa: u64, source: ledger::Source) -> Result<RasEvent, RasError> {
        let poisoned = RasEvent::Poisoned {
            gpa,
            at_ms: self.now_ms(),
        };
        let hva = match self.backed_page(gpa) {
            Err(RasError::AlreadyBad(_)) => return Ok(poisoned),
            r => r?,
        };
        // A page the ledger could not hold would be bad and untracked (never
        // remapped at a reset): refused before the host poisons it.
        if !lock(&self.ledger).has_room_for(gpa) {
            return Err(ledger::Error::Full.into());
        }
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
        lock(&self.ledger).poison(gpa, source, self.now_ms())?;
        Ok(poisoned)
    }

    /// The host address of the guest page at `gpa`, given a frame of its
    /// own, for making it bad: refused for an address that is not a page of
    /// guest RAM, for rasvmm's firmware pages, and (`AlreadyBad`) for a page
    /// whose host memory is already poisoned.
    fn backed_page(&self, gpa: u64) -> Result<*mut u8, RasError> {
        self.check_gpa(gpa)?;
        if !gpa.is_multiple_of(ledger::PAGE_SIZE) {
            return Err(RasError::Unaligned(gpa));
        }
        if lock(&self.firmware).contains(&gpa) {
            // rasvmm itself reads and writes these pages.
            return Err(RasError::Firmware(gpa));
        }
        if lock(&self.ledger).is_sticky(gpa) {
            return Err(RasError::AlreadyBad(gpa));
        }
        let hva = self
            .memory
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| RasError::NotRam(gpa))?;
        // A page the guest never touched is backed by nothing (or the shared
        // zero page), which the host cannot poison (EBUSY): give it its own
        // frame first. MADV_POPULATE_WRITE keeps the contents.
        // SAFETY: populating a page of rasvmm's own guest mapping; the page
        // is not poisoned (checked above), so this cannot fault.
        unsafe { libc::madvise(hva.cast(), 4096, libc::MADV_POPULATE_WRITE) };
        Ok(hva)
    }

    /// The host addresses behind the guest pages at `gpas`, each given a
    /// frame of its own, for a helper outside rasvmm to poison
    /// (`host-poison`). Nothing is done if any page is refused.
    pub fn host_addresses(&self, gpas: &[u64]) -> Result<Vec<u64>, RasError> {
        for &gpa in gpas {
            self.check_gpa(gpa)?;
            if lock(&self.firmware).contains(&gpa) {
                return Err(RasError::Firmware(gpa));
            }
            if lock(&self.ledger).is_sticky(gpa) {
                return Err(RasError::AlreadyBad(gpa));
            }
        }
        gpas.iter()
            .map(|&gpa| self.backed_page(gpa).map(|h| h as u64))
            .collect()
    }

    /// Notes in the ledger what the guest did to its own pages (PFNs) with
    /// hwpoison-inject at rasvmm's request.
    pub fn note_guest_poison(&self, op: GuestPoisonOp, pfns: &[u64]) -> Result<(), RasError> {
        let now = self.now_ms();
        let mut l = lock(&self.ledger);
        for gpa in pfns.iter().filter_map(|p| p.checked_mul(ledger::PAGE_SIZE)) {
            match op {
                GuestPoisonOp::Corrupt => {
                    l.poison(gpa, ledger::Source::Guest, now)?;
                }
                GuestPoisonOp::Unpoison => {
                    l.forget(gpa);
                }
            }
        }
        Ok(())
    }

    /// Notes in the ledger that the guest was told (`told`) the page at
    /// `gpa` is bad.
    fn reported(&self, gpa: u64, told: Told) {
        let mut l = lock(&self.ledger);
        let _ = l.poison(gpa, ledger::Source::Reported, self.now_ms());
        l.tell(gpa, told);
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
        let told = Told::Ghes {
            source: inj.source,
            severity: inj.severity,
        };
        if inj.severity != Severity::Corrected || inj.threshold_exceeded {
            self.reported(inj.gpa, told);
        } else {
            // A page already bad for another reason learns of it too.
            lock(&self.ledger).tell(inj.gpa, told);
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
            Notification::Nmi => self.on_vcpu_notify(vcpu, own, machine::nmi),
            // An SEA with a record of its own: arm64's synchronous source.
            Notification::Sea => self.on_vcpu_notify(vcpu, own, machine::sea),
            Notification::Gsiv => {
                if let Some(g) = &self.ghes {
                    lock(g).notify_gsiv();
                }
                None
            }
            Notification::Polled => None,
        }
    }

    /// Raises `notify` (an NMI, an SEA) on `vcpu`: right here if this is
    /// that vCPU's own thread (`own`), else on its thread, reporting a
    /// failure as an event.
    fn on_vcpu_notify(
        &self,
        vcpu: u8,
        own: Option<&VcpuFd>,
        notify: fn(&VcpuFd, u8) -> Result<(), String>,
    ) -> Option<String> {
        if let Some(fd) = own {
            return notify(fd, vcpu).err();
        }
        if let Some(s) = self.senders().get(usize::from(vcpu)) {
            s.send(VcpuRequest::OnThread(Box::new(move |fd| {
                notify(fd, vcpu)
                    .err()
                    .map(|error| RasEvent::NotifyFailed { vcpu, error })
            })));
        }
        None
    }

    /// Pages the host has poisoned that the ledger does not hold (their
    /// early report was lost, or not asked for), found without touching
    /// them ([`crate::host_pages`]), go into the ledger as the host's; the
    /// guest is told nothing of them until it touches one. Run before
    /// rasvmm itself reads guest RAM, which would otherwise fault on them.
    fn sweep_host_poison(&self) {
        let Ok(found) = crate::host_pages::poisoned(&self.memory, ledger::MAX_PAGES) else {
            return;
        };
        let now = self.now_ms();
        let mut ledger = lock(&self.ledger);
        for gpa in found {
            if ledger.get(gpa).is_none() {
                let _ = ledger.poison(gpa, ledger::Source::Host, now);
            }
        }
    }

    /// The ledger's pages, and the sticky ones (never read: their backing
    /// is hwpoisoned, and any access, the VMM's own included, faults).
    fn kho_inputs(&self) -> (Vec<u64>, std::collections::BTreeSet<u64>) {
        self.sweep_host_poison();
        let entries = self.ledger();
        let ledger: Vec<u64> = entries.iter().map(|e| e.gpa).collect();
        let sticky = entries
            .iter()
            .filter(|e| e.source.is_sticky())
            .map(|e| e.gpa)
            .collect();
        (ledger, sticky)
    }

    /// The guest's own poison list, from the KHO root `kho` pinned, against
    /// the ledger.
    pub fn kho_view(&self, kho: &KhoTracker) -> KhoView {
        let (ledger, sticky) = self.kho_inputs();
        kho_observer::observe(&self.memory, &ledger, &sticky, kho)
    }

    /// The agent said hello: pin the running kernel's KHO root.
    pub fn kho_hello(&self, kho: &mut KhoTracker, kexecs: u32) {
        let (_, sticky) = self.kho_inputs();
        kho.at_hello(&self.memory, &sticky, kexecs);
    }

    /// rasvmm is about to ask the agent to kexec: snapshot the KHO roots.
    pub fn kho_before_kexec(&self, kho: &mut KhoTracker) {
        let (_, sticky) = self.kho_inputs();
        kho.before_kexec(&self.memory, &sticky);
    }

    /// Corrupts the pinned root's hwpoison blob (the `kho-corrupt` step).
    pub fn kho_corrupt(
        &self,
        kho: &KhoTracker,
        edits: &[ras::kho::corrupt::Edit],
    ) -> Result<KhoCorrupted, String> {
        let (_, sticky) = self.kho_inputs();
        kho_observer::corrupt::corrupt(&self.memory, &sticky, kho, edits)
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
