//! Building a VM: the KVM VM, guest memory, the loaded guest, the devices
//! and the vCPUs, every one created and configured before the first runs.
//!
//! [`Vm::start`] hands back a running [`Vm`]: it owns the vCPU threads
//! (finished and joined when the VM is dropped), the RAS controller that
//! every memory error goes through, the agent's UART and the receiving end
//! of the event channel the session consumes. Everything that depends on
//! the guest's architecture comes from the arch crate.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arch::x86_64::vm as arch_vm;
use arch::x86_64::{acpi, board, cpuid, loader, mce as kvm_mce, regs};
use devices::bus::Bus;
use devices::legacy::{Cmos, FnTrigger, PowerPorts, SerialPort, I8042};
use kvm_bindings::{kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use ras::mce::{self, Vendor};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::agent::AgentPort;
use crate::config::{BootSource, ConsoleTarget, VmConfig};
use crate::console::ConsoleOut;
use crate::event::{EventQueue, EventSender, VmEvent};
use crate::ghes_sources::{self, Ghes};
use crate::ras_controller::{McaSetup, RasController};
use crate::vcpu::{self, VcpuChannel, VcpuContext, VcpuHandle};

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
    /// The guest cannot be loaded (the loader's error says what).
    #[error(transparent)]
    Load(loader::Error),
    /// A vCPU cannot be set up.
    #[error("Cannot set up vCPU {0}")]
    Vcpu(u8, #[source] regs::Error),
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
    ras: Arc<RasController>,
    memory: GuestMemoryMmap,
    events: EventQueue,
    events_tx: EventSender,
    agent: Arc<Mutex<AgentPort>>,
    started: Instant,
    config: VmConfig,
    _vm: VmFd,
    _kvm: Kvm,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.finish_vcpus();
    }
}

/// A vCPU created and configured, its thread not started yet.
struct Prepared {
    fd: VcpuFd,
    channel: VcpuChannel,
    mcg_cap: u64,
}

impl Vm {
    /// Creates the VM, loads the guest, creates and configures every vCPU,
    /// then starts them all.
    pub fn start(config: &VmConfig) -> Result<Vm, Error> {
        let started = Instant::now();
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let vm = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("create the VM", e))?;
        arch_vm::setup(&vm).map_err(|(what, e)| Error::Kvm(what, e))?;

        let memory = create_memory(&vm, config.memory_mib)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("get supported CPUID", e))?;
        let cpu_signature = cpuid::apply(config.cpu, supported.as_slice(), 0, config.vcpus)
            .into_iter()
            .find(|e| e.function == 1)
            .map_or((0, 0), |e| (e.eax, e.edx));
        let image = match &config.boot {
            BootSource::Payload { bytes, load_addr } => loader::Image::Payload {
                bytes,
                load_addr: *load_addr,
            },
            BootSource::Linux {
                kernel,
                initramfs,
                cmdline,
            } => loader::Image::Linux {
                kernel,
                initramfs: initramfs.as_deref(),
                cmdline,
            },
        };
        let machine = loader::Machine {
            mem_size: config.memory_mib << 20,
            vcpus: config.vcpus,
            cpu_signature,
        };
        let loaded = loader::load(&memory, image, machine).map_err(Error::Load)?;
        let ghes = match &loaded.ghes_sources {
            Some(l) => {
                let mut g = Ghes::new(memory.clone(), l).map_err(Error::Ghes)?;
                let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
                vm.register_irqfd(&irq, board::GHES_GSI)
                    .map_err(|e| Error::Kvm("register an irqfd", e))?;
                g.set_gsiv_irq(irq);
                Some(g)
            }
            None => None,
        };

        let (tx, rx) = crate::event::queue().map_err(Error::EventFd)?;
        let (pio, agent) = create_devices(&vm, config, &tx)?;
        let pio = Arc::new(pio);
        // This board places every device on port I/O; the MMIO bus is
        // empty (reads float high, writes are dropped).
        let mmio = Arc::new(Bus::new());
        vcpu::install_signal_handlers().map_err(Error::Signals)?;

        let vendor = match config.cpu.vendor {
            cpuid::Vendor::Intel => Vendor::Intel,
            cpuid::Vendor::Amd => Vendor::Amd,
        };
        let wanted_cap = mce::mcg_cap(kvm_mce::cap_supported(&kvm), kvm_mce::max_banks(&kvm));
        let mut mca = McaSetup {
            mcg_cap: wanted_cap,
            mcg_cap_supplied: 0,
            supply_error: None,
            vendor,
        };
        // Every vCPU is created and fully configured before any runs: a
        // boot CPU that ran while an AP was still being configured could
        // have its INIT/SIPI'd AP overwritten with the 64-bit entry state.
        let mut prepared = Vec::with_capacity(usize::from(config.vcpus));
        for i in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(|e| Error::Kvm("create a vCPU", e))?;
            let mut entries = cpuid::apply(config.cpu, supported.as_slice(), i, config.vcpus);
            if wanted_cap == 0 {
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
                    // Decided once: the filter is VM-wide. A KVM without it
                    // leaves the guest without those bits, and
                    // ras_limitation says why.
                    mca.mcg_cap_supplied = mce::supplied_cap_bits(vendor, wanted_cap, effective);
                    if mca.mcg_cap_supplied != 0 {
                        let guest_cap = effective | mca.mcg_cap_supplied;
                        if let Err(e) = kvm_mce::serve_mcg_cap_reads(&kvm, &vm, guest_cap) {
                            mca.supply_error = Some(e.to_string());
                            mca.mcg_cap_supplied = 0;
                        }
                    }
                }
                mca.mcg_cap = effective | mca.mcg_cap_supplied;
            }
            regs::setup_vcpu(&fd, loaded.entry).map_err(|e| Error::Vcpu(i, e))?;
            prepared.push(Prepared {
                fd,
                channel: VcpuChannel::new(i),
                mcg_cap: mca.mcg_cap,
            });
        }

        let ras = Arc::new(RasController::new(
            memory.clone(),
            mca,
            ghes,
            config.poison_report,
            loaded.firmware.clone(),
            started,
        ));
        ras.set_vcpus(
            prepared
                .iter()
                .map(|p| p.channel.sender().clone())
                .collect(),
        );
        let mut vcpus = Vec::with_capacity(prepared.len());
        for (i, p) in (0u8..).zip(prepared) {
            let ctx = VcpuContext {
                index: i,
                pio: pio.clone(),
                mmio: mmio.clone(),
                events: tx.clone(),
                mcg_cap: p.mcg_cap,
                ras: ras.clone(),
            };
            // On failure `vcpus` drops: the threads already started are
            // finished and joined.
            vcpus.push(VcpuHandle::spawn(p.fd, p.channel, ctx).map_err(Error::Spawn)?);
        }

        Ok(Vm {
            vcpus,
            ras,
            memory,
            events: rx,
            events_tx: tx,
            agent,
            started,
            config: config.clone(),
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
    let ranges: Vec<(GuestAddress, usize)> = arch_vm::ram_regions(mib << 20)
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

fn create_devices(
    vm: &VmFd,
    config: &VmConfig,
    tx: &EventSender,
) -> Result<(Bus, Arc<Mutex<AgentPort>>), Error> {
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
    let mut bus = Bus::new();
    let place = |bus: &mut Bus, slot: board::Slot, dev| {
        bus.insert(slot.base, slot.len, dev).map_err(Error::Bus)
    };
    let console = SerialPort::new(
        irq(board::CONSOLE_UART.gsi)?,
        ConsoleOut::new(target, tx.clone()),
    );
    place(&mut bus, board::CONSOLE_UART, Arc::new(Mutex::new(console)))?;
    let agent = Arc::new(Mutex::new(
        AgentPort::new(irq(board::AGENT_UART.gsi)?, tx.clone()).map_err(Error::EventFd)?,
    ));
    place(&mut bus, board::AGENT_UART, agent.clone())?;
    let reset_tx = tx.clone();
    let i8042 = I8042::new(FnTrigger::new(move || {
        let _ = reset_tx.send(VmEvent::Reset);
    }));
    place(&mut bus, board::I8042, Arc::new(Mutex::new(i8042)))?;
    place(&mut bus, board::CMOS, Arc::new(Mutex::new(Cmos)))?;
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
        u64::from(acpi::POWER_PORT),
        u64::from(acpi::POWER_PORT_LEN),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::event::VcpuStop;

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
            memory_mib: 64,
            vcpus,
            cpu: cpuid::profile("amd").unwrap(),
            console: ConsoleTarget::Discard,
            timeout: Duration::from_secs(30),
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
