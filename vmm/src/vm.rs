//! Building a VM: the KVM VM, guest memory, the loaded guest, the devices
//! and the vCPUs, every one created and configured before the first runs.
//!
//! [`Vm::start`] hands back a running [`Vm`]: it owns the vCPU threads
//! (finished and joined when the VM is dropped), the RAS controller that
//! every memory error goes through, the agent's UART and the receiving end
//! of the event channel the session consumes. Everything that depends on
//! the guest's architecture comes from the arch crate.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::agent::AgentPort;
use crate::config::HostMceKill;
use crate::config::VmConfig;
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
}

/// A started VM.
pub struct Vm {
    // Dropped first (see Drop): every vCPU thread finished and joined
    // before the VM's fds close.
    vcpus: Vec<VcpuHandle>,
    _early_reports: Option<EarlyReports>,
    ras: Arc<RasController>,
    memory: GuestMemoryMmap,
    events: EventQueue,
    events_tx: EventSender,
    agent: Arc<Mutex<AgentPort>>,
    started: Instant,
    config: VmConfig,
    _irqchip: Irqchip,
    _vm: VmFd,
    _kvm: Kvm,
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
        let memory = create_memory(&vm, config.memory_mib)?;
        let loaded = machine::load(&kvm, &memory, config)?;
        // Every vCPU is created and fully configured before any runs.
        let (prepared, ras_setup) = machine::create_vcpus(&kvm, &vm, config, &loaded)?;
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
        let (tx, rx) = crate::event::queue().map_err(Error::EventFd)?;
        let devices = machine::create_devices(&vm, config, &tx)?;
        let (pio, mmio) = (Arc::new(devices.pio), Arc::new(devices.mmio));
        vcpu::install_signal_handlers().map_err(Error::Signals)?;
        // Before any vCPU thread: they inherit the late policy.
        crate::host_errors::late_by_default().map_err(Error::EarlyReports)?;
        let early_reports = match config.host_mce_kill {
            HostMceKill::Early => {
                Some(EarlyReports::start(tx.clone()).map_err(Error::EarlyReports)?)
            }
            HostMceKill::Late => None,
        };

        let channels: Vec<VcpuChannel> = (0..config.vcpus).map(VcpuChannel::new).collect();
        let ras = Arc::new(RasController::new(
            memory.clone(),
            ras_setup,
            ghes,
            config.poison_report,
            loaded.firmware.clone(),
            started,
        ));
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

        Ok(Vm {
            vcpus,
            _early_reports: early_reports,
            ras,
            memory,
            events: rx,
            events_tx: tx,
            agent: devices.agent,
            started,
            config: config.clone(),
            _irqchip: irqchip,
            _vm: vm,
            _kvm: kvm,
        })
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
        self.vcpus
            .iter()
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
        for v in &self.vcpus {
            v.finish();
        }
        // Join every thread, even after one that panicked.
        let joined: Vec<bool> = self.vcpus.iter_mut().map(VcpuHandle::join).collect();
        joined.into_iter().all(|ok| ok)
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
    let ranges: Vec<(GuestAddress, usize)> = machine::ram_regions(mib << 20)
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
        unsafe { vm.set_user_memory_region(mr) }.map_err(Error::RegisterMemory)?;
    }
    Ok(memory)
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

// The payloads are x86 code.
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::{BootSource, ConsoleTarget};
    use crate::event::{VcpuStop, VmEvent};

    /// A payload VM on this machine's /dev/kvm (any backend, PVM included).
    fn payload(bytes: Vec<u8>, vcpus: u8) -> VmConfig {
        assert!(
            std::path::Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: this test exercises rasvmm's vCPU threads and needs it"
        );
        VmConfig {
            boot: BootSource::Payload {
                bytes,
                load_addr: 0x10_0000,
            },
            poison_report: Default::default(),
            tables: Default::default(),
            memory_mib: 64,
            vcpus,
            cpu: arch::guest::profile("amd").unwrap(),
            console: ConsoleTarget::Discard,
            timeout: Duration::from_secs(30),
            host_mce_kill: Default::default(),
        }
    }

    #[test]
    fn vcpu_threads_start_kick_finish_and_join() {
        // vCPU 0 runs ud2 through the empty boot IDT and triple-faults, so
        // its thread ends; vCPU 1 waits for a SIPI inside KVM_RUN.
        let mut vm = Vm::start(&payload(vec![0x0f, 0x0b], 2)).unwrap();
        let mut waiter = crate::event_loop::EventLoop::new(vm.events().wake_fd()).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        let first = loop {
            if let Ok(e) = vm.events().try_recv() {
                break e;
            }
            assert!(Instant::now() < until, "no event from the vCPUs");
            waiter.wait(Duration::from_millis(100)).unwrap();
        };
        match first {
            VmEvent::Stopped {
                vcpu: 0,
                stop: VcpuStop::TripleFault(state),
            } => assert!(state.contains("rip 0x"), "{state}"),
            other => panic!("expected vCPU 0's triple fault, got {other:?}"),
        }
        // A kick for the stopped vCPU reaches no thread; the waiting one is
        // kicked out of KVM_RUN and answers from its own thread.
        let states = vm.vcpu_states(Duration::from_millis(500), "now");
        assert!(states[0].contains("no answer"), "{states:?}");
        assert!(states[1].contains("mp_state"), "{states:?}");
        // Again: kicks are repeatable and never hit an exited thread.
        let again = vm.vcpu_states(Duration::from_millis(500), "now");
        assert!(again[1].contains("mp_state"), "{again:?}");
        let t = Instant::now();
        assert!(vm.finish_vcpus(), "every vCPU thread joined cleanly");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // Finished: nothing answers, nothing is signalled.
        let after = vm.vcpu_states(Duration::from_millis(100), "now");
        assert!(after.iter().all(|s| s.contains("no answer")), "{after:?}");
        assert!(vm.finish_vcpus(), "finishing twice is harmless");
    }

    #[test]
    fn a_running_vcpu_is_finished_and_joined_when_the_vm_drops() {
        // jmp $: the vCPU never leaves the guest on its own.
        let vm = Vm::start(&payload(vec![0xeb, 0xfe], 1)).unwrap();
        let states = vm.vcpu_states(Duration::from_secs(2), "now");
        assert!(states[0].contains("rip 0x100000"), "{states:?}");
        let t = Instant::now();
        drop(vm);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
