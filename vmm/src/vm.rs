//! Building a VM: the KVM VM, guest memory, the loaded guest, the devices
//! and the vCPUs, every one created and configured before the first runs.
//!
//! [`Vm::start`] hands back a running [`Vm`]: it owns the vCPU threads
//! (finished and joined when the VM is dropped), the RAS controller that
//! every memory error goes through, the agent's UART and the receiving end
//! of the event channel the session consumes. Everything that depends on
//! the guest's architecture comes from the arch crate.
//!
//! A VM outlives its boots. Guest memory, the event queue and the RAS
//! controller (with its ledger) are made once; a [`Boot`] is the rest: a
//! KVM VM with that memory registered, its irqchip, devices and vCPUs, and
//! the guest loaded into memory again. KVM cannot destroy a vCPU, so a
//! guest reset with `--on-reboot restart` ends the boot
//! ([`Vm::end_boot`]: every vCPU thread joined, the KVM VM closed), deals
//! with the poisoned pages ([`Vm::reset_memory`]) and builds the next
//! ([`Vm::next_boot`]) on the same memory, as a reset leaves DRAM as it
//! was.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use ras::ledger::PageFate;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::agent::AgentPort;
use crate::config::HostMceKill;
use crate::config::VmConfig;
use crate::einj::EinjDevice;
use crate::event::{EventQueue, EventSender};
use crate::ghes_sources::{self, Ghes};
use crate::host_errors::EarlyReports;
use crate::machine::{self, Irqchip};
use crate::ras_controller::RasController;
use crate::vcpu::{self, VcpuChannel, VcpuContext, VcpuHandle};

/// Errors creating or starting a VM.
#[derive(Debug, Error)]
pub enum Error {
    /// /dev/kvm cannot be opened.
    #[error("Cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The machine cannot be assembled (its error says what).
    #[error(transparent)]
    Machine(#[from] machine::Error),
    /// Guest memory cannot be allocated.
    #[error("Cannot allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// Guest memory's mappings cannot be marked MADV_DONTFORK.
    #[error("Cannot mark guest memory MADV_DONTFORK")]
    Madvise(#[source] std::io::Error),
    /// Guest memory cannot be registered with KVM.
    #[error("Failed to register guest memory")]
    RegisterMemory(#[source] kvm_ioctls::Error),
    /// An eventfd cannot be created.
    #[error("Failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The GHES error interrupt cannot be wired.
    #[error("Failed to register the GHES error interrupt")]
    GhesIrq(#[source] kvm_ioctls::Error),
    /// A vCPU thread cannot be started.
    #[error("Failed to spawn a vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// Signal handlers cannot be installed.
    #[error("Failed to install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The control API cannot start.
    #[error("Cannot start the control API")]
    Api(#[source] crate::api::Error),
    /// The thread for the host's early memory-error reports cannot start.
    #[error("Cannot ask the host kernel for early memory-error reports (prctl PR_MCE_KILL)")]
    EarlyReports(#[source] std::io::Error),
    /// The session's event loop cannot start.
    #[error("Cannot start the session's event loop")]
    EventLoop(#[source] crate::event_loop::Error),
    /// The GHES error sources cannot be set up.
    #[error("Cannot set up the GHES error sources")]
    Ghes(#[source] ghes_sources::Error),
    /// The RAS controller cannot take the next boot, or its poisoned pages
    /// cannot be handled at the reset.
    #[error("Cannot reset the guest's poisoned memory")]
    Reset(#[source] crate::ras_controller::RasError),
    /// Loading the guest again would write to a page kept poisoned.
    #[error("Cannot load the guest again: page {0:#x}, kept poisoned across the reset, lies under its image or tables")]
    KeptUnderImage(u64),
}

/// A started VM.
pub struct Vm {
    // Dropped first (see Drop): every vCPU thread finished and joined
    // before the VM's fds close.
    boot: Option<Boot>,
    _early_reports: Option<EarlyReports>,
    ras: Arc<RasController>,
    memory: GuestMemoryMmap,
    events: EventQueue,
    events_tx: EventSender,
    /// The current boot's agent UART (the last boot's if none runs).
    agent: Arc<Mutex<AgentPort>>,
    /// The current boot's EINJ window, if its tables offer EINJ.
    einj: Option<Arc<Mutex<EinjDevice>>>,
    started: Instant,
    config: VmConfig,
    kvm: Kvm,
}

/// One boot of the machine: what a guest reset rebuilds.
struct Boot {
    // Dropped first: the threads are joined before the fds close.
    vcpus: Vec<VcpuHandle>,
    _irqchip: Irqchip,
    _vm: VmFd,
}

/// A boot assembled, its vCPUs not started yet.
struct Assembled {
    vm: VmFd,
    irqchip: Irqchip,
    prepared: Vec<machine::Prepared>,
    ras_setup: machine::RasSetup,
    ghes: Option<Ghes>,
    firmware: std::ops::Range<u64>,
    devices: machine::Devices,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.finish_vcpus();
    }
}

impl Vm {
    /// Creates the VM, loads the guest, creates and configures every vCPU,
    /// then starts them all.
    pub fn start(config: &VmConfig) -> Result<Vm, Error> {
        let started = Instant::now();
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let vm = machine::create_vm(&kvm)?;
        let memory = create_memory(config.memory_mib)?;
        let (tx, rx) = crate::event::queue().map_err(Error::EventFd)?;
        vcpu::install_signal_handlers().map_err(Error::Signals)?;
        // Before any vCPU thread: they inherit the late policy.
        crate::host_errors::late_by_default().map_err(Error::EarlyReports)?;
        let early_reports = match config.host_mce_kill {
            HostMceKill::Early => {
                Some(EarlyReports::start(tx.clone()).map_err(Error::EarlyReports)?)
            }
            HostMceKill::Late => None,
        };
        let a = assemble(&kvm, vm, &memory, config, &tx)?;
        let ras = Arc::new(RasController::new(
            memory.clone(),
            a.ras_setup,
            a.ghes,
            config.poison_report,
            a.firmware,
            started,
        ));
        let agent = a.devices.agent.clone();
        let einj = a.devices.einj.clone();
        let boot = spawn(a.vm, a.irqchip, a.prepared, a.devices, &ras, config, &tx)?;
        Ok(Vm {
            boot: Some(boot),
            _early_reports: early_reports,
            ras,
            memory,
            events: rx,
            events_tx: tx,
            agent,
            einj,
            started,
            config: config.clone(),
            kvm,
        })
    }

    /// Ends the current boot: every vCPU thread finished and joined, the
    /// KVM VM, its irqchip and devices closed. Guest memory, the event
    /// queue and the RAS controller stay. True if every thread ended
    /// without panicking.
    pub fn end_boot(&mut self) -> bool {
        let joined = self.finish_vcpus();
        self.boot = None;
        joined
    }

    /// The reset's effect on guest memory, between [`Vm::end_boot`] and
    /// [`Vm::next_boot`]: each poisoned page replaced by fresh zeroed
    /// memory, or kept bad if `keep_poison`. Returns what became of each
    /// ledger page.
    pub fn reset_memory(&mut self, keep_poison: bool) -> Result<Vec<PageFate>, Error> {
        if self.boot.is_some() {
            self.end_boot();
        }
        self.ras.at_reset(keep_poison).map_err(Error::Reset)
    }

    /// Builds and starts the next boot on the same guest memory (after
    /// [`Vm::reset_memory`]): a new KVM VM with the memory registered, the
    /// guest loaded again, new devices and vCPUs.
    pub fn next_boot(&mut self) -> Result<(), Error> {
        if self.boot.is_some() {
            self.end_boot();
        }
        let kept: Vec<u64> = self
            .ras
            .ledger()
            .iter()
            .filter(|e| e.source.is_sticky())
            .map(|e| e.gpa)
            .collect();
        if let Some(gpa) = kept_under_image(&self.kvm, &self.config, &kept)? {
            // The loader would write to hwpoisoned memory: a firmware that
            // cannot load its kernel onto broken DRAM.
            return Err(Error::KeptUnderImage(gpa));
        }
        let vm = machine::create_vm(&self.kvm)?;
        let a = assemble(&self.kvm, vm, &self.memory, &self.config, &self.events_tx)?;
        // The machine-check set-up is the first boot's: the same KVM and
        // configuration give every boot the same.
        drop(a.ras_setup);
        self.ras
            .new_boot(a.ghes, a.firmware)
            .map_err(Error::Reset)?;
        self.agent = a.devices.agent.clone();
        self.einj = a.devices.einj.clone();
        let boot = spawn(
            a.vm,
            a.irqchip,
            a.prepared,
            a.devices,
            &self.ras,
            &self.config,
            &self.events_tx,
        )?;
        self.boot = Some(boot);
        Ok(())
    }

    /// A sender into this VM's event channel (for the control API).
    pub fn event_sender(&self) -> EventSender {
        self.events_tx.clone()
    }

    /// The event channel the session consumes.
    pub(crate) fn events(&self) -> &EventQueue {
        &self.events
    }

    /// The agent's UART.
    pub(crate) fn agent(&self) -> &Arc<Mutex<AgentPort>> {
        &self.agent
    }

    /// The current boot's EINJ window, if its tables offer EINJ.
    pub(crate) fn einj(&self) -> Option<&Arc<Mutex<EinjDevice>>> {
        self.einj.as_ref()
    }

    /// The RAS controller: every memory error goes through it.
    pub fn ras(&self) -> &RasController {
        &self.ras
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// When the VMM started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Where each vCPU is (`when`: "at the deadline", ...): its registers
    /// and pending events, or that it did not answer within `wait` (busy in
    /// rasvmm itself, not in the guest, or stopped).
    pub fn vcpu_states(&self, wait: Duration, when: &str) -> Vec<String> {
        let until = Instant::now() + wait;
        self.boot
            .iter()
            .flat_map(|b| &b.vcpus)
            .map(|h| {
                let i = h.sender().index;
                let left = until.saturating_duration_since(Instant::now());
                match h.sender().state(left) {
                    Some(s) => format!("rasvmm: vCPU {i} {when}: {s}"),
                    None => format!(
                        "rasvmm: vCPU {i} {when}: no answer within {} ms (its thread is busy outside KVM_RUN, or has stopped)",
                        wait.as_millis()
                    ),
                }
            })
            .collect()
    }

    /// Asks every vCPU thread to finish, then joins them all (they finish
    /// in parallel); true if every thread ended without panicking. The VM
    /// does this when dropped; after it, no vCPU runs.
    pub fn finish_vcpus(&mut self) -> bool {
        let Some(boot) = &mut self.boot else {
            return true;
        };
        for v in &boot.vcpus {
            v.finish();
        }
        // Join every thread, even after one that panicked.
        let joined: Vec<bool> = boot.vcpus.iter_mut().map(VcpuHandle::join).collect();
        joined.into_iter().all(|ok| ok)
    }

    /// Guest RAM resident in this process, in KiB, as VmRSS counts it (for
    /// overhead accounting; 0 if /proc/self/smaps cannot be read).
    pub fn guest_resident_kib(&self) -> u64 {
        let ranges: Vec<std::ops::Range<u64>> = self
            .memory
            .iter()
            .map(|r| {
                let start = r.as_ptr() as u64;
                start..start.saturating_add(r.len())
            })
            .collect();
        std::fs::read_to_string("/proc/self/smaps")
            .map(|s| crate::host_pages::rss_within_kib(&s, &ranges))
            .unwrap_or(0)
    }
}

/// Guest RAM, not yet registered with any KVM VM.
///
/// Its mappings are MADV_DONTFORK, as QEMU's and Cloud Hypervisor's guest
/// RAM is: a child rasvmm starts does not share them, and the flag keeps
/// the kernel from merging them with rasvmm's own anonymous mappings, so
/// /proc/self/smaps shows guest RAM apart (see [`Vm::guest_resident_kib`]).
fn create_memory(mib: u64) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> = machine::ram_regions(mib << 20)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), usize::try_from(l).unwrap_or(usize::MAX)))
        .collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(mib, e))?;
    for r in memory.iter() {
        let len = usize::try_from(r.len()).unwrap_or(usize::MAX);
        // SAFETY: `r` is one live mapping of `len` bytes that guest memory
        // owns; MADV_DONTFORK only changes what a fork copies.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), len, libc::MADV_DONTFORK) };
        if rc != 0 {
            return Err(Error::Madvise(std::io::Error::last_os_error()));
        }
    }
    Ok(memory)
}

/// Registers guest RAM with a KVM VM (each boot's).
fn register_memory(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in memory.iter().enumerate() {
        let mr = kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by
        // the VM's guest memory, which outlives every boot's KVM VM (a `Vm`
        // drops its boot first).
        unsafe { vm.set_user_memory_region(mr) }.map_err(Error::RegisterMemory)?;
    }
    Ok(())
}

/// One boot's machine on `memory`: the memory registered with `vm`, the
/// guest loaded, every vCPU created and configured, the irqchip, the GHES
/// sources and the devices.
fn assemble(
    kvm: &Kvm,
    vm: VmFd,
    memory: &GuestMemoryMmap,
    config: &VmConfig,
    tx: &EventSender,
) -> Result<Assembled, Error> {
    register_memory(&vm, memory)?;
    let loaded = machine::load(kvm, memory, config)?;
    // Every vCPU is created and fully configured before any runs.
    let (prepared, ras_setup) = machine::create_vcpus(kvm, &vm, config, &loaded)?;
    // The interrupt controller (arm64's GIC needs every vCPU first),
    // then the devices and their interrupts.
    let irqchip = machine::create_irqchip(&vm)?;
    let ghes = match &loaded.ghes_sources {
        Some(l) => {
            let mut g = Ghes::new(memory.clone(), l).map_err(Error::Ghes)?;
            let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
            vm.register_irqfd(&irq, machine::GHES_GSI)
                .map_err(Error::GhesIrq)?;
            g.set_gsiv_irq(irq);
            Some(g)
        }
        None => None,
    };
    let devices = machine::create_devices(&vm, config, &loaded, tx)?;
    Ok(Assembled {
        vm,
        irqchip,
        prepared,
        ras_setup,
        ghes,
        firmware: loaded.firmware,
        devices,
    })
}

/// Hands `ras` the vCPUs' request handles, then starts every vCPU thread.
fn spawn(
    vm: VmFd,
    irqchip: Irqchip,
    prepared: Vec<machine::Prepared>,
    devices: machine::Devices,
    ras: &Arc<RasController>,
    config: &VmConfig,
    tx: &EventSender,
) -> Result<Boot, Error> {
    let (pio, mmio) = (Arc::new(devices.pio), Arc::new(devices.mmio));
    let channels: Vec<VcpuChannel> = (0..config.vcpus).map(VcpuChannel::new).collect();
    ras.set_vcpus(channels.iter().map(|c| c.sender().clone()).collect());
    let mut vcpus = Vec::with_capacity(prepared.len());
    for ((i, p), channel) in (0u8..).zip(prepared).zip(channels) {
        let ctx = VcpuContext {
            index: i,
            pio: pio.clone(),
            mmio: mmio.clone(),
            events: tx.clone(),
            arch: p.arch,
            ras: ras.clone(),
        };
        // On failure `vcpus` drops: the threads already started are
        // finished and joined.
        vcpus.push(VcpuHandle::spawn(p.fd, channel, ctx).map_err(Error::Spawn)?);
    }
    Ok(Boot {
        vcpus,
        _irqchip: irqchip,
        _vm: vm,
    })
}

/// The first of the `kept` pages (hwpoisoned, never to be written by
/// rasvmm) that loading the guest would write to, found by loading it into
/// scratch memory of the same layout and looking which pages became
/// resident.
fn kept_under_image(kvm: &Kvm, config: &VmConfig, kept: &[u64]) -> Result<Option<u64>, Error> {
    if kept.is_empty() {
        return Ok(None);
    }
    let scratch = create_memory(config.memory_mib)?;
    machine::load(kvm, &scratch, config)?;
    let written = |gpa: u64| {
        scratch.iter().any(|r| {
            let start = r.start_addr().0;
            gpa >= start && gpa - start < r.len() && {
                let offset = usize::try_from(gpa - start).unwrap_or(usize::MAX);
                // SAFETY: `offset` is inside the region (checked above), so
                // the pointer stays within its mapping.
                let page = unsafe { r.as_ptr().add(offset) };
                resident_pages(page, PAGE) == 1
            }
        })
    };
    Ok(kept.iter().copied().find(|&gpa| written(gpa)))
}

const PAGE: usize = 4096;

/// Resident pages of a mapping, by mincore(2) (0 if it cannot tell).
fn resident_pages(ptr: *mut u8, len: usize) -> u64 {
    let pages = len.div_ceil(PAGE);
    let mut vec = vec![0u8; pages];
    // SAFETY: `ptr..ptr+len` is one live mapping owned by guest memory, and
    // `vec` has one byte per page of it.
    let r = unsafe { libc::mincore(ptr.cast(), len, vec.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    vec.iter().filter(|b| *b & 1 != 0).count() as u64
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests;
