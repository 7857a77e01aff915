//! A running VM and the session that watches it.
//!
//! [`Vm::start`] creates the KVM VM, loads the guest, wires the devices and
//! starts one thread per vCPU. Everything the guest does that matters to the
//! VMM arrives as a [`VmEvent`] on one channel; [`Session`] consumes it,
//! talks to the guest agent and classifies the outcome. The session runs on
//! the caller's thread, so there is one place where the run's state lives.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arch::x86_64::{acpi, boot, cpuid, layout, mptable, regs};
use devices::bus::{lock, PioBus};
use devices::legacy::{Cmos, FnTrigger, PowerPorts, SerialPort, I8042};
use guest_agent::{
    decode_agent_message, encode, AgentMessage, Command, Hello, Payload, ProtocolError, Request,
    SignalReport,
};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::agent::AgentPort;
use crate::config::{BootSource, ConsoleTarget, VmConfig};
use crate::console::ConsoleOut;
use crate::ghes::{self, Ghes, GHES_GSI};
use crate::mce as kvm_mce;
use crate::outcome::{Classifier, Outcome};
use crate::steps::{Refs, Step, Target};
use crate::vcpu::{self, RasEvent, VcpuContext, VcpuHandle, VcpuRequest, VcpuStop};
use ras::cper::Severity;
use ras::ghes::{Notification, SourceLayout};
use ras::ledger::{self, Ledger};
use ras::mce::{self as enc, MceRecord, MemoryError};

/// COM1: the console.
const COM1: (u16, u32) = (0x3f8, 4);
/// COM2: the agent channel.
const COM2: (u16, u32) = (0x2f8, 3);
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Something the guest or a vCPU did.
#[derive(Debug)]
pub enum VmEvent {
    /// A console line.
    Console(String),
    /// A line from the agent (or why it was rejected).
    Agent(Result<Vec<u8>, ProtocolError>),
    /// The guest pulsed the reset line (i8042 0xfe, or the ACPI reset register).
    Reset,
    /// The guest entered ACPI S5 through the sleep control register.
    PowerOff,
    /// A RAS event a vCPU thread saw (a poisoned page consumed).
    Ras(RasEvent),
    /// A control API request.
    Api(crate::api::ApiCall),
    /// A vCPU stopped running.
    Stopped {
        /// Which.
        vcpu: u8,
        /// Why.
        stop: VcpuStop,
    },
}

impl From<crate::api::ApiCall> for VmEvent {
    fn from(call: crate::api::ApiCall) -> Self {
        VmEvent::Api(call)
    }
}

/// Errors creating or starting a VM.
#[derive(Debug, Error)]
pub enum Error {
    /// /dev/kvm cannot be opened.
    #[error("Cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("Failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory cannot be allocated.
    #[error("Cannot allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// A file cannot be read.
    #[error("Cannot read {0} '{1}'")]
    Read(&'static str, String, #[source] std::io::Error),
    /// The kernel is neither a bzImage nor an ELF vmlinux.
    #[error("Kernel '{0}' is not a loadable bzImage or ELF vmlinux")]
    KernelFormat(String, #[source] linux_loader::loader::Error),
    /// The initramfs is larger than guest RAM can hold.
    #[error("Initramfs '{0}' does not fit in guest memory")]
    InitrdTooLarge(String, #[source] boot::Error),
    /// The boot layout cannot be built.
    #[error("Invalid boot configuration")]
    Boot(#[source] boot::Error),
    /// The MP table cannot be built.
    #[error("Cannot describe the vCPUs")]
    MpTable(#[source] mptable::Error),
    /// A vCPU cannot be set up.
    #[error("Cannot set up vCPU {0}")]
    Vcpu(u8, #[source] regs::Error),
    /// Writing into guest memory failed.
    #[error("Failed to write {0} into guest memory")]
    GuestMemory(&'static str, #[source] vm_memory::GuestMemoryError),
    /// An eventfd cannot be created.
    #[error("Failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A console file cannot be created.
    #[error("Cannot create console file '{0}'")]
    ConsoleFile(String, #[source] std::io::Error),
    /// A device cannot be placed on the bus.
    #[error("Cannot place a device")]
    Bus(#[source] devices::bus::Error),
    /// A vCPU thread cannot be started.
    #[error("Failed to spawn a vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// Signal handlers cannot be installed.
    #[error("Failed to install signal handlers")]
    Signals(#[source] std::io::Error),
    /// Machine-check banks cannot be set up.
    #[error("Cannot set up machine-check banks")]
    Mce(#[source] kvm_mce::Error),
    /// The control API cannot start.
    #[error("Cannot start the control API")]
    Api(#[source] crate::api::Error),
    /// The ACPI tables cannot be built.
    #[error("Cannot build the ACPI tables")]
    Acpi(#[source] acpi::Error),
    /// The GHES error sources cannot be set up.
    #[error("Cannot set up the GHES error sources")]
    Ghes(#[source] ghes::Error),
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
    Record(#[from] enc::Error),
    /// The guest state refuses it (CR4.MCE, MCIP, disabled banks).
    #[error("{0}")]
    Guest(#[from] kvm_mce::Error),
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
    Ghes(#[from] ghes::Error),
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

/// A started VM.
pub struct Vm {
    // Kept so the VM outlives its vCPU threads' file descriptors.
    _kvm: Kvm,
    _vm: VmFd,
    memory: GuestMemoryMmap,
    events: Receiver<VmEvent>,
    agent: Arc<Mutex<AgentPort>>,
    started: Instant,
    config: VmConfig,
    vcpus: Arc<OnceLock<Vec<VcpuHandle>>>,
    events_tx: Sender<VmEvent>,
    mcg_cap: u64,
    mcg_cap_supplied: u64,
    // Why rasvmm could not supply MCG_CAP bits KVM dropped, if it could not.
    supply_error: Option<String>,
    vendor: enc::Vendor,
    ledger: Arc<Mutex<Ledger>>,
    ghes: Option<Arc<Mutex<Ghes>>>,
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

impl Vm {
    /// Creates the VM, loads the guest and starts the vCPUs.
    pub fn start(config: &VmConfig) -> Result<Vm, Error> {
        let started = Instant::now();
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let vm = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("create the VM", e))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| Error::Kvm("set the identity map address", e))?;
        vm.set_tss_address(usize::try_from(layout::KVM_TSS_ADDRESS).unwrap_or(usize::MAX))
            .map_err(|e| Error::Kvm("set the TSS address", e))?;
        vm.create_irq_chip()
            .map_err(|e| Error::Kvm("create the in-kernel irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| Error::Kvm("create the in-kernel PIT", e))?;

        let memory = create_memory(&vm, config.memory_mib)?;
        let (entry, ghes_sources) = load_guest(&memory, config)?;
        let ghes = match ghes_sources {
            Some(l) => {
                let mut g = Ghes::new(memory.clone(), &l).map_err(Error::Ghes)?;
                let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
                vm.register_irqfd(&irq, GHES_GSI)
                    .map_err(|e| Error::Kvm("register an irqfd", e))?;
                g.set_gsiv_irq(irq);
                Some(Arc::new(Mutex::new(g)))
            }
            None => None,
        };

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("get supported CPUID", e))?;
        let leaf1 = cpuid::apply(config.cpu, supported.as_slice(), 0, config.vcpus)
            .into_iter()
            .find(|e| e.function == 1)
            .map_or((0, 0), |e| (e.eax, e.edx));
        let mpt = mptable::build(config.vcpus, leaf1.0, leaf1.1).map_err(Error::MpTable)?;
        memory
            .write_slice(&mpt, GuestAddress(layout::EBDA_START))
            .map_err(|e| Error::GuestMemory("MP table", e))?;
        regs::write_boot_tables(&memory).map_err(|e| Error::Vcpu(0, e))?;

        let (tx, rx) = channel();
        let (bus, agent) = create_devices(&vm, config, &tx)?;
        let bus = Arc::new(bus);

        vcpu::install_signal_handlers().map_err(Error::Signals)?;
        let wanted_cap = enc::mcg_cap(kvm_mce::cap_supported(&kvm), kvm_mce::max_banks(&kvm));
        let mut mcg_cap = wanted_cap;
        let mut mcg_cap_supplied = 0;
        let mut supply_error = None;
        let vendor = match config.cpu.vendor {
            cpuid::Vendor::Intel => enc::Vendor::Intel,
            cpuid::Vendor::Amd => enc::Vendor::Amd,
        };
        let ledger = Arc::new(Mutex::new(Ledger::new()));
        let peers: Arc<OnceLock<Vec<VcpuHandle>>> = Arc::new(OnceLock::new());
        let mut handles = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(|e| Error::Kvm("create a vCPU", e))?;
            let mut entries = cpuid::apply(config.cpu, supported.as_slice(), i, config.vcpus);
            if mcg_cap == 0 {
                // No banks: do not claim MCE/MCA in CPUID either.
                cpuid::clear_mca(&mut entries);
            }
            let cpuid = CpuId::from_entries(&entries)
                .map_err(|_| Error::Kvm("build CPUID", kvm_ioctls::Error::new(libc::E2BIG)))?;
            fd.set_cpuid2(&cpuid)
                .map_err(|e| Error::Kvm("set CPUID", e))?;
            if wanted_cap != 0 {
                kvm_mce::setup(&fd, i, wanted_cap).map_err(Error::Mce)?;
                let effective = kvm_mce::effective_cap(&fd, i).map_err(Error::Mce)?;
                if i == 0 {
                    // Decided once, before the first vCPU runs: the filter is
                    // VM-wide. A KVM without it leaves the guest without
                    // those bits, and ras_limitation says why.
                    mcg_cap_supplied = enc::supplied_cap_bits(vendor, wanted_cap, effective);
                    if mcg_cap_supplied != 0 {
                        let guest_cap = effective | mcg_cap_supplied;
                        if let Err(e) = kvm_mce::serve_mcg_cap_reads(&kvm, &vm, guest_cap) {
                            supply_error = Some(e.to_string());
                            mcg_cap_supplied = 0;
                        }
                    }
                }
                mcg_cap = effective | mcg_cap_supplied;
            }
            regs::setup_vcpu(&fd, entry).map_err(|e| Error::Vcpu(i, e))?;
            let (req_tx, req_rx) = channel();
            let ctx = VcpuContext {
                index: i,
                bus: bus.clone(),
                events: tx.clone(),
                requests: req_rx,
                mcg_cap,
                vendor,
                memory: memory.clone(),
                ledger: ledger.clone(),
                peers: peers.clone(),
                started,
                poison_report: config.poison_report,
                ghes: ghes.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run(fd, ctx))
                .map_err(Error::Spawn)?;
            handles.push(VcpuHandle::new(i, req_tx, thread.as_pthread_t()));
        }
        // Set once, before anything can ask for a broadcast.
        let _ = peers.set(handles);

        Ok(Vm {
            _kvm: kvm,
            _vm: vm,
            memory,
            events: rx,
            agent,
            started,
            config: config.clone(),
            vcpus: peers,
            events_tx: tx,
            mcg_cap,
            mcg_cap_supplied,
            supply_error,
            vendor,
            ledger,
            ghes,
        })
    }

    /// A sender into this VM's event channel (for the control API).
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.events_tx.clone()
    }

    /// The vCPUs' MCG_CAP as the guest sees it (0 if KVM offers no machine checks).
    pub fn mcg_cap(&self) -> u64 {
        self.mcg_cap
    }

    /// MCG_CAP bits the guest reads from rasvmm rather than from KVM (SER_P
    /// for an Intel profile on an SVM host), 0 when KVM gives them all.
    pub fn mcg_cap_supplied(&self) -> u64 {
        self.mcg_cap_supplied
    }

    /// Why this VM cannot report memory errors recoverably, if it cannot.
    pub fn ras_limitation(&self) -> Option<String> {
        if self.mcg_cap == 0 {
            return Some("KVM offers no machine-check banks".into());
        }
        (!enc::recoverable(self.vendor, self.mcg_cap)).then(|| {
            let why = match &self.supply_error {
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

    /// Milliseconds since the VMM started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn check_gpa(&self, gpa: u64) -> Result<(), RasError> {
        if self.memory.address_in_range(GuestAddress(gpa)) {
            Ok(())
        } else {
            Err(RasError::NotRam(gpa))
        }
    }

    fn vcpu_handles(&self, vcpu: u8) -> Result<&[VcpuHandle], RasError> {
        let handles = self.vcpus.get().map(Vec::as_slice).unwrap_or_default();
        let count = u8::try_from(handles.len()).unwrap_or(u8::MAX);
        if vcpu >= count {
            return Err(RasError::NoVcpu(vcpu, count));
        }
        Ok(handles)
    }

    /// Injects a named memory error, checking every target vCPU first.
    pub fn inject(&self, inj: &Injection) -> Result<RasEvent, RasError> {
        self.check_gpa(inj.gpa)?;
        self.vcpu_handles(inj.vcpu)?;
        if self.mcg_cap == 0 {
            return Err(RasError::NoMce);
        }
        if inj.local && self.mcg_cap & enc::MCG_LMCE_P == 0 {
            return Err(RasError::NoLmce);
        }
        let record = enc::encode(inj.error, self.vendor, inj.gpa, inj.local);
        let broadcast = enc::is_broadcast(inj.error, self.vendor, inj.local);
        self.inject_record(inj.vcpu, &record, broadcast)?;
        self.reported(inj.gpa);
        Ok(RasEvent::Injected {
            error: inj.error,
            gpa: inj.gpa,
            vcpu: inj.vcpu,
            broadcast,
            at_ms: self.now_ms(),
            refused: None,
        })
    }

    /// Injects a raw record on `vcpu` (and its broadcast companions if it
    /// raises #MC without LMCES), after validating it against MCG_CAP.
    pub fn inject_record(
        &self,
        vcpu: u8,
        record: &MceRecord,
        broadcast: bool,
    ) -> Result<(), RasError> {
        let handles = self.vcpu_handles(vcpu)?;
        if self.mcg_cap == 0 {
            return Err(RasError::NoMce);
        }
        enc::validate(record, self.mcg_cap)?;
        let companion = enc::broadcast_companion();
        let plan: Vec<(&VcpuHandle, MceRecord)> = handles
            .iter()
            .filter(|h| broadcast || h.index == vcpu)
            .map(|h| (h, if h.index == vcpu { *record } else { companion }))
            .collect();
        // Phase 1: every target must accept; phase 2: inject. A refusal in
        // phase 1 leaves the guest untouched. One target checks and injects
        // in a single request: its vCPU thread does both, nothing between.
        let phases: &[bool] = if plan.len() == 1 {
            &[false]
        } else {
            &[true, false]
        };
        for &check_only in phases {
            let mut replies = Vec::new();
            for (h, r) in &plan {
                let (tx, rx) = channel();
                h.send(VcpuRequest::Mce {
                    record: *r,
                    check_only,
                    reply: tx,
                });
                replies.push((h.index, rx));
            }
            for (i, rx) in replies {
                rx.recv_timeout(Duration::from_secs(5))
                    .map_err(|_| RasError::VcpuGone(i))??;
            }
        }
        Ok(())
    }

    /// Makes the guest page at `gpa` bad like failed DRAM: rasvmm's own
    /// mapping of it is hwpoisoned on the host (madvise MADV_HWPOISON), so
    /// every later guest access, from any instruction, stops in KVM before it
    /// executes and comes back to the vCPU thread as SIGBUS BUS_MCEERR_AR,
    /// which rasvmm turns into an action-required machine check.
    pub fn poison(&self, gpa: u64) -> Result<RasEvent, RasError> {
        self.check_gpa(gpa)?;
        if !gpa.is_multiple_of(ledger::PAGE_SIZE) {
            return Err(RasError::Unaligned(gpa));
        }
        if (layout::ACPI_START..layout::GHES_START + layout::GHES_SIZE).contains(&gpa) {
            // rasvmm itself reads and writes these pages.
            return Err(RasError::Firmware(gpa));
        }
        if lock(&self.ledger).is_sticky(gpa) {
            return Ok(RasEvent::Poisoned {
                gpa,
                at_ms: self.now_ms(),
            });
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
        Ok(RasEvent::Poisoned {
            gpa,
            at_ms: self.now_ms(),
        })
    }

    /// Reports a memory error through a GHES error source (see [`ghes`]).
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
        let poisons = inj.severity != Severity::Corrected || inj.threshold_exceeded;
        if poisons {
            self.reported(inj.gpa);
        }
        Ok(e)
    }

    /// Notes in the ledger that the guest was told the page at `gpa` is bad.
    fn reported(&self, gpa: u64) {
        let _ = lock(&self.ledger).poison(gpa, ledger::Source::Reported, self.now_ms());
    }

    /// Reports a raw CPER record through a GHES error source, validated
    /// first: a refused record leaves guest memory untouched.
    pub fn ghes_raw(
        &self,
        source: Notification,
        record: Vec<u8>,
        vcpu: u8,
    ) -> Result<RasEvent, RasError> {
        self.vcpu_handles(vcpu)?;
        let ghes = self.ghes.as_ref().ok_or(ghes::Error::NoSources)?;
        let report = lock(ghes).raw(source, record)?;
        if report.submitted == ras::ghes::Submitted::Written {
            self.ghes_notify(source, vcpu);
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
            self.ghes_notify(n, 0);
        }
        waiting
    }

    /// The GHES sources' counters.
    pub fn ghes_state(&self) -> Vec<ghes::SourceState> {
        self.ghes
            .as_ref()
            .map(|g| lock(g).stats())
            .unwrap_or_default()
    }

    /// Tells the guest a record is in `source`'s block.
    fn ghes_notify(&self, source: Notification, vcpu: u8) {
        match source {
            Notification::Nmi => {
                if let Some(h) = self.vcpus.get().and_then(|v| v.get(usize::from(vcpu))) {
                    h.send(VcpuRequest::Nmi);
                }
            }
            Notification::Gsiv => {
                if let Some(g) = &self.ghes {
                    lock(g).notify_gsiv();
                }
            }
            Notification::Polled => {}
        }
    }

    /// The guest's own poison list, from its KHO state, against the ledger.
    pub fn kho_view(&self) -> crate::kho::KhoView {
        let entries = self.ledger();
        let ledger: Vec<u64> = entries.iter().map(|e| e.gpa).collect();
        // Sticky pages fault on any access, the VMM's own included.
        let sticky: std::collections::BTreeSet<u64> = entries
            .iter()
            .filter(|e| e.source.is_sticky())
            .map(|e| e.gpa)
            .collect();
        crate::kho::observe(&self.memory, &ledger, &sticky)
    }

    /// Where each vCPU is: its registers and pending events, or that it did
    /// not answer within `wait` (busy in rasvmm itself, not in the guest).
    pub fn vcpu_states(&self, wait: Duration) -> Vec<String> {
        let handles = self.vcpus.get().map(Vec::as_slice).unwrap_or_default();
        let asked: Vec<(u8, Receiver<String>)> = handles
            .iter()
            .map(|h| {
                let (tx, rx) = channel();
                h.send(VcpuRequest::State { reply: tx });
                (h.index, rx)
            })
            .collect();
        let until = Instant::now() + wait;
        asked
            .into_iter()
            .map(|(i, rx)| {
                match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(s) => format!("rasvmm: vCPU {i} at the deadline: {s}"),
                    Err(_) => format!(
                        "rasvmm: vCPU {i} at the deadline: no answer within {} ms (its thread is busy outside KVM_RUN)",
                        wait.as_millis()
                    ),
                }
            })
            .collect()
    }

    /// Guest RAM resident in this process, in KiB (for overhead accounting).
    pub fn guest_resident_kib(&self) -> u64 {
        self.memory
            .iter()
            .map(|r| resident_kib(r.as_ptr(), usize::try_from(r.len()).unwrap_or(0)))
            .sum()
    }
}

fn create_memory(vm: &VmFd, mib: u64) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mib << 20)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), usize::try_from(l).unwrap_or(usize::MAX)))
        .collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(mib, e))?;
    for (slot, region) in memory.iter().enumerate() {
        let mr = kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by
        // `memory`, which the returned value keeps alive for the VM's life.
        unsafe { vm.set_user_memory_region(mr) }
            .map_err(|e| Error::Kvm("register guest memory", e))?;
    }
    Ok(memory)
}

/// Loads the kernel, initramfs, command line, ACPI tables and zero page (or
/// a raw payload); returns the 64-bit entry point and, for Linux, the GHES
/// error sources the HEST describes.
fn load_guest(
    memory: &GuestMemoryMmap,
    config: &VmConfig,
) -> Result<(u64, Option<Vec<SourceLayout>>), Error> {
    let mem_size = config.memory_mib << 20;
    match &config.boot {
        BootSource::Payload { bytes, load_addr } => {
            memory
                .write_slice(bytes, GuestAddress(*load_addr))
                .map_err(|e| Error::GuestMemory("payload", e))?;
            Ok((*load_addr, None))
        }
        BootSource::Linux {
            kernel,
            initramfs,
            cmdline,
        } => {
            let kname = kernel.display().to_string();
            let mut kf = File::open(kernel).map_err(|e| Error::Read("kernel", kname.clone(), e))?;
            let mut magic = [0u8; 4];
            kf.read_exact(&mut magic)
                .map_err(|e| Error::Read("kernel", kname.clone(), e))?;
            let high = Some(GuestAddress(layout::HIGH_RAM_START));
            let (loaded, entry) = if magic == *b"\x7fELF" {
                let r = Elf::load(memory, None, &mut kf, high)
                    .map_err(|e| Error::KernelFormat(kname.clone(), e))?;
                let entry = r.kernel_load.0;
                (r, entry)
            } else {
                let r = BzImage::load(memory, None, &mut kf, high)
                    .map_err(|e| Error::KernelFormat(kname.clone(), e))?;
                let entry = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
                (r, entry)
            };
            let hdr = loaded.setup_header.as_ref();
            boot::check_cmdline(cmdline, hdr).map_err(Error::Boot)?;
            let mut c = cmdline.as_bytes().to_vec();
            c.push(0);
            memory
                .write_slice(&c, GuestAddress(layout::CMDLINE_START))
                .map_err(|e| Error::GuestMemory("command line", e))?;

            let kernel_end = loaded.kernel_load.0 + loaded.kernel_end;
            let initrd = match initramfs {
                Some(path) => Some(load_initramfs(memory, path, hdr, mem_size, kernel_end)?),
                None => None,
            };
            let (sources, ghes_size) = ras::ghes::layout(layout::GHES_START, GHES_GSI);
            debug_assert!(ghes_size <= layout::GHES_SIZE);
            let tables = write_acpi_tables(memory, config.vcpus, &sources)?;
            let acpi_size = tables.size.next_multiple_of(0x1000);
            let e820 = boot::e820_map(
                mem_size,
                &[
                    (layout::ACPI_START, acpi_size, boot::E820_ACPI),
                    (layout::GHES_START, layout::GHES_SIZE, boot::E820_RESERVED),
                ],
            );
            let params = boot::boot_params(&boot::BootSpec {
                hdr,
                cmdline_len: cmdline.len(),
                initrd,
                e820: &e820,
                acpi_rsdp: Some(tables.rsdp),
            })
            .map_err(Error::Boot)?;
            memory
                .write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
                .map_err(|e| Error::GuestMemory("zero page", e))?;
            Ok((entry, Some(sources)))
        }
    }
}

/// The ISA devices rasvmm has, for the DSDT.
const ISA_DEVICES: [acpi::IsaDevice; 4] = [
    acpi::IsaDevice {
        name: "COM1",
        hid: "PNP0501",
        uid: 1,
        port: COM1.0,
        len: 8,
        irq: Some(COM1.1),
    },
    acpi::IsaDevice {
        name: "COM2",
        hid: "PNP0501",
        uid: 2,
        port: COM2.0,
        len: 8,
        irq: Some(COM2.1),
    },
    acpi::IsaDevice {
        name: "PS2K",
        hid: "PNP0303",
        uid: 0,
        port: 0x60,
        len: 5,
        irq: None,
    },
    acpi::IsaDevice {
        name: "RTC_",
        hid: "PNP0B00",
        uid: 0,
        port: 0x70,
        len: 2,
        irq: None,
    },
];

/// Writes the ACPI tables, with a HEST describing `sources`.
fn write_acpi_tables(
    memory: &GuestMemoryMmap,
    vcpus: u8,
    sources: &[SourceLayout],
) -> Result<acpi::Tables, Error> {
    let hest = ras::ghes::hest(sources, acpi::OEM_ID, acpi::OEM_TABLE_ID);
    let tables = acpi::build(&acpi::Platform {
        vcpus,
        ioapic_id: mptable::ioapic_id(vcpus),
        devices: &ISA_DEVICES,
        extra: &[hest],
        error_gsi: Some(GHES_GSI),
    })
    .map_err(Error::Acpi)?;
    for (addr, bytes) in &tables.blobs {
        memory
            .write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| Error::GuestMemory("ACPI tables", e))?;
    }
    Ok(tables)
}

fn load_initramfs(
    memory: &GuestMemoryMmap,
    path: &Path,
    hdr: Option<&linux_loader::loader::bootparam::setup_header>,
    mem_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), Error> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|e| Error::Read("initramfs", name.clone(), e))?;
    let size = f
        .metadata()
        .map_err(|e| Error::Read("initramfs", name.clone(), e))?
        .len();
    let addr = boot::initrd_address(hdr, mem_size, kernel_end, size)
        .map_err(|e| Error::InitrdTooLarge(name.clone(), e))?;
    let written = memory
        .read_volatile_from(
            GuestAddress(addr),
            &mut f,
            usize::try_from(size).unwrap_or(usize::MAX),
        )
        .map_err(|e| Error::GuestMemory("initramfs", e))?;
    if written as u64 != size {
        return Err(Error::Read(
            "initramfs",
            name,
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read"),
        ));
    }
    Ok((addr, size))
}

fn create_devices(
    vm: &VmFd,
    config: &VmConfig,
    tx: &Sender<VmEvent>,
) -> Result<(PioBus, Arc<Mutex<AgentPort>>), Error> {
    let irq = |gsi: u32| -> Result<EventFd, Error> {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&fd, gsi)
            .map_err(|e| Error::Kvm("register an irqfd", e))?;
        Ok(fd)
    };
    let target: Option<Box<dyn Write + Send>> = match &config.console {
        ConsoleTarget::Stdout => Some(Box::new(std::io::stdout())),
        // Line-buffered: one write(2) per console line rather than per
        // character the guest prints (every one a UART exit already).
        ConsoleTarget::File(p) => Some(Box::new(std::io::LineWriter::new(
            File::create(p).map_err(|e| Error::ConsoleFile(p.display().to_string(), e))?,
        ))),
        ConsoleTarget::Discard => None,
    };
    let mut bus = PioBus::new();
    let console = SerialPort::new(irq(COM1.1)?, ConsoleOut::new(target, tx.clone()));
    bus.insert(COM1.0, 8, Arc::new(Mutex::new(console)))
        .map_err(Error::Bus)?;
    let agent = Arc::new(Mutex::new(
        AgentPort::new(irq(COM2.1)?, tx.clone()).map_err(Error::EventFd)?,
    ));
    bus.insert(COM2.0, 8, agent.clone()).map_err(Error::Bus)?;
    let reset_tx = tx.clone();
    let i8042 = I8042::new(FnTrigger::new(move || {
        let _ = reset_tx.send(VmEvent::Reset);
    }));
    bus.insert(0x60, 5, Arc::new(Mutex::new(i8042)))
        .map_err(Error::Bus)?;
    bus.insert(0x70, 2, Arc::new(Mutex::new(Cmos)))
        .map_err(Error::Bus)?;
    let power_tx = tx.clone();
    let power = PowerPorts::new(move |offset, value| {
        let event = match acpi::power_request(offset, value) {
            Some(acpi::PowerRequest::PowerOff) => VmEvent::PowerOff,
            Some(acpi::PowerRequest::Reset) => VmEvent::Reset,
            None => return,
        };
        let _ = power_tx.send(event);
    });
    bus.insert(
        acpi::POWER_PORT,
        u16::from(acpi::POWER_PORT_LEN),
        Arc::new(Mutex::new(power)),
    )
    .map_err(Error::Bus)?;
    Ok((bus, agent))
}

/// Resident KiB of a mapping, by mincore(2).
fn resident_kib(ptr: *mut u8, len: usize) -> u64 {
    const PAGE: usize = 4096;
    let pages = len.div_ceil(PAGE);
    let mut vec = vec![0u8; pages];
    // SAFETY: `ptr..ptr+len` is one live mapping owned by guest memory, and
    // `vec` has one byte per page of it.
    let r = unsafe { libc::mincore(ptr.cast(), len, vec.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    vec.iter().filter(|b| *b & 1 != 0).count() as u64 * (PAGE as u64 / 1024)
}

/// Why an agent call did not return a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The agent answered with an error.
    Agent(String),
    /// The run ended (the guest stopped or the deadline passed) first.
    Ended,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Agent(e) => write!(f, "agent: {e}"),
            CallError::Ended => write!(f, "the run ended before the agent replied"),
        }
    }
}

/// Drives a started VM to its outcome.
pub struct Session {
    vm: Vm,
    classifier: Classifier,
    deadline: Instant,
    outcome: Option<Outcome>,
    hello: Option<(Hello, Duration)>,
    /// Whether the agent is up now (false from a kexec until the new
    /// kernel's agent says hello).
    agent_up: bool,
    /// Guest kexecs so far.
    kexecs: u32,
    next_id: u64,
    /// Signals the agent reported.
    pub signals: Vec<SignalReport>,
    /// When each of `signals` arrived, ms from VMM start.
    pub signal_ms: Vec<u64>,
    /// Lines from the agent that were rejected.
    pub agent_errors: Vec<String>,
    /// RAS events: poisonings, injections, consumptions.
    pub ras_events: Vec<RasEvent>,
    /// Times the agent's receive interrupt had to be re-asserted.
    pub agent_kicks: u32,
    /// Pages the guest reported, by name (shared by steps and the API).
    pub refs: Refs,
    /// API connections that subscribed to events.
    subscribers: Vec<crate::api::Reply>,
    /// Agent requests made for API clients: agent id -> (command, API id, connection).
    api_pending: std::collections::BTreeMap<u64, (Command, u64, crate::api::Reply)>,
    /// Addresses reported through GHES, to check the guest's decode against.
    ghes_addresses: std::collections::BTreeSet<u64>,
}

/// How long a reply may be overdue, with bytes waiting and no guest read,
/// before the agent UART's interrupt is re-asserted.
const AGENT_STALL: Duration = Duration::from_secs(1);

/// How often records waiting for a GHES acknowledgement are looked at.
const GHES_PUMP_INTERVAL: Duration = Duration::from_millis(2);

/// Most RAS events one run records (later ones are counted, not kept).
const MAX_RAS_EVENTS: usize = 10_000;

impl Session {
    /// Watches `vm` until its configured deadline.
    pub fn new(vm: Vm) -> Self {
        let deadline = vm.started + vm.config.timeout;
        Self {
            vm,
            classifier: Classifier::new(),
            deadline,
            outcome: None,
            hello: None,
            agent_up: false,
            kexecs: 0,
            next_id: 1,
            signals: Vec::new(),
            signal_ms: Vec::new(),
            agent_errors: Vec::new(),
            ras_events: Vec::new(),
            agent_kicks: 0,
            refs: Refs::default(),
            subscribers: Vec::new(),
            api_pending: std::collections::BTreeMap::new(),
            ghes_addresses: std::collections::BTreeSet::new(),
        }
    }

    /// Whether API clients are listening for events.
    pub fn has_subscribers(&self) -> bool {
        !self.subscribers.is_empty()
    }

    /// Sends an event line to every subscriber, forgetting closed ones.
    fn publish<T: serde::Serialize>(&mut self, event: &T) {
        if self.subscribers.is_empty() {
            return;
        }
        let l = crate::api::line(&serde_json::json!({ "event": event }));
        self.subscribers.retain(|s| s.send(l.clone()).is_ok());
    }

    fn record(&mut self, e: RasEvent) {
        self.publish(&e);
        if self.ras_events.len() < MAX_RAS_EVENTS {
            self.ras_events.push(e);
        }
    }

    fn finish(&mut self, o: Outcome) {
        if self.outcome.is_none() {
            self.publish(&serde_json::json!({
                "event": "outcome",
                "outcome": o.kind,
                "detail": o.detail,
            }));
            self.outcome = Some(o);
        }
    }

    /// Performs one step, resolving references; returns the agent's reply
    /// as JSON for agent steps.
    pub fn perform(&mut self, step: &Step) -> Result<Option<serde_json::Value>, String> {
        match step {
            Step::Agent { cmd, pfn } => {
                let cmd = self.resolve(cmd, pfn.as_ref())?;
                let reply = self.call(cmd.clone()).map_err(|e| e.to_string())?;
                self.refs.learn(&cmd, &reply);
                Ok(Some(serde_json::to_value(&reply).unwrap_or_default()))
            }
            Step::Inject {
                error,
                target,
                vcpu,
                local,
            } => {
                let inj = Injection {
                    error: *error,
                    gpa: self.refs.gpa(target)?,
                    vcpu: *vcpu,
                    local: *local,
                };
                self.inject(&inj).map_err(|e| e.to_string())?;
                Ok(None)
            }
            Step::Poison(target) => {
                let gpa = self.refs.gpa(target)?;
                self.poison(gpa).map_err(|e| e.to_string())?;
                Ok(None)
            }
            Step::GhesMemory {
                severity,
                target,
                source,
                threshold,
                vcpu,
            } => {
                let inj = GhesInjection {
                    source: *source,
                    severity: *severity,
                    gpa: self.refs.gpa(target)?,
                    threshold_exceeded: *threshold,
                    vcpu: *vcpu,
                };
                let e = self.vm.ghes_memory_error(&inj).map_err(|e| e.to_string())?;
                self.record_ghes(e);
                Ok(None)
            }
            Step::GhesRaw { source, record } => {
                let e = self
                    .vm
                    .ghes_raw(*source, record.clone(), 0)
                    .map_err(|e| e.to_string())?;
                self.record_ghes(e);
                Ok(None)
            }
            Step::KhoScan => Ok(Some(serde_json::json!({
                "kho": serde_json::to_value(self.vm.kho_view()).unwrap_or_default()
            }))),
            Step::Wait(d) => {
                self.wait(*d);
                Ok(None)
            }
        }
    }

    /// Records a GHES report and remembers its address for checking the
    /// guest's decode.
    fn record_ghes(&mut self, e: RasEvent) {
        if let RasEvent::GhesReported { gpa: Some(a), .. } = &e {
            if self.ghes_addresses.len() < MAX_RAS_EVENTS {
                self.ghes_addresses.insert(*a);
            }
        }
        self.record(e);
    }

    fn resolve(&self, cmd: &Command, pfn: Option<&Target>) -> Result<Command, String> {
        let mut cmd = cmd.clone();
        if let (Some(t), Command::PageInfo { pfn: p }) = (pfn, &mut cmd) {
            *p = self.refs.pfn(t)?;
        }
        Ok(cmd)
    }

    /// Serves one control API request.
    fn serve_api(&mut self, call: crate::api::ApiCall) {
        use crate::api::{Answer, Request};
        let crate::api::ApiCall { envelope, reply } = call;
        let id = envelope.id;
        let answer = match envelope.request {
            Request::Step(text) => match crate::steps::parse(&text) {
                Err(e) => Answer::err(id, e),
                Ok(Step::Wait(_)) => Answer::err(id, "wait is the client's to do over the API"),
                Ok(Step::Agent { .. }) if !self.agent_up => Answer::err(
                    id,
                    "the guest agent is not ready yet (see state's agent_ready_ms)",
                ),
                Ok(Step::Agent { cmd, pfn }) => match self.resolve(&cmd, pfn.as_ref()) {
                    Err(e) => Answer::err(id, e),
                    Ok(cmd) => {
                        let agent_id = self.next_id;
                        self.next_id += 1;
                        let l = encode(&guest_agent::Request {
                            id: agent_id,
                            cmd: cmd.clone(),
                        });
                        match lock(&self.vm.agent).send(&l) {
                            Err(e) => Answer::err(id, e),
                            Ok(()) => {
                                self.api_pending.insert(agent_id, (cmd, id, reply));
                                return;
                            }
                        }
                    }
                },
                Ok(step) => match self.perform(&step) {
                    Ok(_) => Answer::ok(id, serde_json::Value::Null),
                    Err(e) => Answer::err(id, e),
                },
            },
            Request::Mce(raw) => {
                let record = MceRecord {
                    bank: raw.bank,
                    status: raw.status,
                    addr: raw.addr,
                    misc: raw.misc,
                    mcg_status: raw.mcg_status,
                };
                let broadcast = self.vm.vendor == enc::Vendor::Intel
                    && raw.mcg_status & enc::MCG_STATUS_MCIP != 0
                    && raw.mcg_status & enc::MCG_STATUS_LMCES == 0;
                match self.vm.inject_record(raw.vcpu, &record, broadcast) {
                    Ok(()) => {
                        self.record(RasEvent::InjectedRaw {
                            record,
                            vcpu: raw.vcpu,
                            broadcast,
                            at_ms: self.vm.now_ms(),
                        });
                        Answer::ok(id, serde_json::Value::Null)
                    }
                    Err(e) => Answer::err(id, e),
                }
            }
            Request::Ledger => Answer::ok(
                id,
                serde_json::to_value(self.vm.ledger()).unwrap_or_default(),
            ),
            Request::Kho => Answer::ok(
                id,
                serde_json::to_value(self.vm.kho_view()).unwrap_or_default(),
            ),
            Request::State => Answer::ok(
                id,
                serde_json::json!({
                    "elapsed_ms": self.vm.now_ms(),
                    "agent_ready_ms": self.hello.as_ref().map(|(_, d)| d.as_millis()),
                    "guest_kernel": self.hello.as_ref().map(|(h, _)| h.kernel.clone()),
                    "outcome": self.outcome.as_ref().map(|o| o.kind),
                    "mcg_cap": self.vm.mcg_cap,
                    "mcg_cap_supplied": self.vm.mcg_cap_supplied,
                    "ghes_sources": self.vm.ghes_state(),
                    "ras_limitation": self.vm.ras_limitation(),
                    "poisoned_pages": lock(&self.vm.ledger).len(),
                    "ras_events": self.ras_events.len(),
                    "signals": self.signals.len(),
                }),
            ),
            Request::Subscribe => {
                if self.subscribers.len() < 16 {
                    self.subscribers.push(reply.clone());
                    Answer::ok(id, serde_json::Value::Null)
                } else {
                    Answer::err(id, "too many subscribers")
                }
            }
            Request::Shutdown => {
                let _ = reply.send(Answer::ok(id, serde_json::Value::Null));
                let o = self
                    .classifier
                    .stopped("shutdown requested over the control API".into());
                self.finish(o);
                return;
            }
        };
        let _ = reply.send(answer);
    }

    /// Injects a memory error (see [`Vm::inject`]).
    pub fn inject(&mut self, inj: &Injection) -> Result<(), RasError> {
        let e = self.vm.inject(inj)?;
        self.record(e);
        Ok(())
    }

    /// Poisons a page (see [`Vm::poison`]).
    pub fn poison(&mut self, gpa: u64) -> Result<(), RasError> {
        let e = self.vm.poison(gpa)?;
        self.record(e);
        Ok(())
    }

    /// Lets the guest run for `d` (or until the run ends).
    pub fn wait(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while self.outcome.is_none() && Instant::now() < until {
            self.step_until(until);
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Time since the VMM started.
    pub fn elapsed(&self) -> Duration {
        self.vm.started.elapsed()
    }

    /// The agent's greeting and when it came, once it has.
    pub fn hello(&self) -> Option<&(Hello, Duration)> {
        self.hello.as_ref()
    }

    /// Waits for the agent's hello (after a kexec, the new kernel's).
    /// `None` if the run ended first.
    pub fn wait_agent(&mut self) -> Option<&(Hello, Duration)> {
        while !self.agent_up && self.outcome.is_none() {
            self.step();
        }
        self.hello.as_ref().filter(|_| self.agent_up)
    }

    /// Guest kexecs so far.
    pub fn kexecs(&self) -> u32 {
        self.kexecs
    }

    /// The agent loaded the next kernel and is rebooting into it: wait for
    /// the new agent before any further request.
    fn guest_kexecs(&mut self) {
        self.agent_up = false;
        self.kexecs = self.kexecs.saturating_add(1);
        self.record(RasEvent::GuestKexec {
            kexecs: self.kexecs,
            at_ms: self.vm.now_ms(),
        });
    }

    /// Sends `cmd` to the agent and waits for its reply.
    pub fn call(&mut self, cmd: Command) -> Result<Payload, CallError> {
        if self.wait_agent().is_none() {
            return Err(CallError::Ended);
        }
        let id = self.next_id;
        self.next_id += 1;
        let kexec = matches!(cmd, Command::Kexec { .. });
        let line = encode(&Request { id, cmd });
        if let Err(e) = lock(&self.vm.agent).send(&line) {
            return Err(CallError::Agent(e.to_string()));
        }
        let mut reads = lock(&self.vm.agent).reads();
        let mut check_at = Instant::now() + AGENT_STALL;
        while self.outcome.is_none() {
            if let Some(AgentMessage::Reply(r)) = self.step_until(check_at) {
                if r.id == id {
                    return match (r.ok, r.error) {
                        (Some(p), _) => {
                            if kexec {
                                self.guest_kexecs();
                            }
                            Ok(p)
                        }
                        (None, e) => Err(CallError::Agent(e.unwrap_or_default())),
                    };
                }
            }
            if Instant::now() >= check_at {
                let mut port = lock(&self.vm.agent);
                if port.reads() == reads && port.rx_waiting() {
                    port.kick();
                    self.agent_kicks = self.agent_kicks.saturating_add(1);
                }
                reads = port.reads();
                check_at = Instant::now() + AGENT_STALL;
            }
        }
        Err(CallError::Ended)
    }

    /// Waits for the run to end and returns how.
    pub fn wait_outcome(&mut self) -> Outcome {
        loop {
            if let Some(o) = &self.outcome {
                return o.clone();
            }
            self.step();
        }
    }

    /// Handles one event (or the deadline); returns agent messages other
    /// than the hello to the caller.
    fn step(&mut self) -> Option<AgentMessage> {
        self.step_until(self.deadline)
    }

    /// Like [`Session::step`], but gives up quietly at `until` if that
    /// comes before the deadline.
    fn step_until(&mut self, until: Instant) -> Option<AgentMessage> {
        if self.outcome.is_some() {
            return None;
        }
        let until = until.min(self.deadline);
        let mut left = until.saturating_duration_since(Instant::now());
        let ghes_waiting = self.vm.ghes_pump();
        if ghes_waiting {
            // Records wait for the guest's acknowledgement: look again soon.
            left = left.min(GHES_PUMP_INTERVAL);
        }
        let event = match self.vm.events.recv_timeout(left) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) if ghes_waiting && Instant::now() < until => {
                return None
            }
            Err(RecvTimeoutError::Timeout) if until < self.deadline => return None,
            Err(RecvTimeoutError::Timeout) => {
                let secs = self.vm.config.timeout.as_secs_f64();
                let mut o = self.classifier.deadline(secs);
                if o.kind == crate::outcome::OutcomeKind::Timeout {
                    // Where the guest was stuck, for diagnosis.
                    o.log
                        .extend(self.vm.vcpu_states(Duration::from_millis(500)));
                    let mut port = lock(&self.vm.agent);
                    o.log.push(format!(
                        "rasvmm: agent UART at the deadline: {} guest reads, data waiting for the guest: {}",
                        port.reads(),
                        port.rx_waiting()
                    ));
                }
                self.finish(o);
                return None;
            }
            Err(RecvTimeoutError::Disconnected) => {
                let o = self.classifier.vmm_error("all vCPU threads exited".into());
                self.finish(o);
                return None;
            }
        };
        match event {
            VmEvent::Console(line) => {
                if let Some(physical_addr) = ghes::decoded_address(&line) {
                    let matches_report = self.ghes_addresses.contains(&physical_addr);
                    self.record(RasEvent::GuestDecoded {
                        physical_addr,
                        matches_report,
                    });
                }
                if let Some(o) = self.classifier.console_line(&line) {
                    self.finish(o);
                }
            }
            VmEvent::Reset => {
                let o = self.classifier.reset();
                self.finish(o);
            }
            VmEvent::PowerOff => {
                let o = self.classifier.power_off("ACPI S5");
                self.finish(o);
            }
            VmEvent::Ras(e) => {
                if let RasEvent::Consumed {
                    gpa, ghes: Some(_), ..
                } = &e
                {
                    // A consumption reported through GHES: the guest will
                    // decode this address.
                    if self.ghes_addresses.len() < MAX_RAS_EVENTS {
                        self.ghes_addresses.insert(*gpa);
                    }
                }
                self.record(e);
            }
            VmEvent::Api(call) => self.serve_api(call),
            VmEvent::Stopped { vcpu, stop } => {
                let o = match stop {
                    VcpuStop::TripleFault(state) => self.classifier.triple_fault(vcpu, &state),
                    VcpuStop::SystemReset => self.classifier.reset(),
                    VcpuStop::SystemShutdown => {
                        self.classifier.power_off("KVM_SYSTEM_EVENT_SHUTDOWN")
                    }
                    VcpuStop::Error(e) => self.classifier.vmm_error(format!("vCPU {vcpu}: {e}")),
                };
                self.finish(o);
            }
            VmEvent::Agent(line) => match line.and_then(|l| decode_agent_message(&l)) {
                Ok(AgentMessage::Hello(h)) => {
                    if self.hello.is_none() {
                        self.hello = Some((h, self.elapsed()));
                    }
                    if !self.agent_up && self.kexecs > 0 {
                        // The kernel after a kexec is up: what does it
                        // believe is poisoned?
                        let view = self.vm.kho_view();
                        self.record(RasEvent::KhoScanned {
                            after_kexec: self.kexecs,
                            view: Box::new(view),
                        });
                    }
                    self.agent_up = true;
                }
                Ok(AgentMessage::Signal(s)) => {
                    self.publish(&serde_json::json!({ "event": "signal", "signal": s }));
                    if self.signals.len() < MAX_RAS_EVENTS {
                        self.signals.push(s);
                        self.signal_ms.push(self.vm.now_ms());
                    }
                }
                Ok(AgentMessage::Reply(r)) if self.api_pending.contains_key(&r.id) => {
                    if let Some((cmd, api_id, conn)) = self.api_pending.remove(&r.id) {
                        let answer = match (r.ok, r.error) {
                            (Some(p), _) => {
                                if matches!(cmd, Command::Kexec { .. }) {
                                    self.guest_kexecs();
                                }
                                self.refs.learn(&cmd, &p);
                                crate::api::Answer::ok(
                                    api_id,
                                    serde_json::to_value(&p).unwrap_or_default(),
                                )
                            }
                            (None, e) => crate::api::Answer::err(
                                api_id,
                                format!("agent: {}", e.unwrap_or_default()),
                            ),
                        };
                        let _ = conn.send(answer);
                    }
                }
                Ok(m) => return Some(m),
                Err(e) => {
                    if self.agent_errors.len() < 100 {
                        self.agent_errors.push(e.to_string());
                    }
                }
            },
        }
        None
    }
}
