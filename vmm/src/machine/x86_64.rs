//! The x86_64 machine: an in-kernel irqchip and PIT, CPUID from a named CPU
//! profile, machine-check banks with the MCG_CAP the guest needs to grade
//! errors, devices on port I/O (two 16550As, the i8042 reset line, CMOS,
//! the ACPI power device), and the boot tables of arch::x86_64::loader.

use std::sync::{Arc, Mutex};

use arch::x86_64::vm as arch_vm;
use arch::x86_64::{acpi, board, cpuid, loader, mce as kvm_mce, regs};
use devices::bus::Bus;
use devices::legacy::{Cmos, FnTrigger, PowerPorts, SerialPort, I8042};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use ras::mce::{self, Vendor};
use vm_memory::GuestMemoryMmap;

use super::{console_target, irqfd, Devices, Error, Loaded, Prepared};
use crate::agent::{AgentOut, AgentPort};
use crate::config::{BootSource, BootTables, VmConfig};
use crate::console::ConsoleOut;
use crate::event::{EventSender, VmEvent};

pub use arch::x86_64::regs::describe;

/// The loader's errors.
pub type LoadError = loader::Error;
/// A vCPU set-up error.
pub type VcpuError = regs::Error;
/// An interrupt-controller error.
pub type IrqchipError = kvm_ioctls::Error;
/// A machine-check set-up error.
pub type RasSetupError = kvm_mce::Error;
/// Why a vCPU refused a machine check (CR4.MCE clear, MCIP set, banks off).
pub type DeliveryError = kvm_mce::Error;

/// The GSI the GHES error interrupt (GSIV) is raised on.
pub const GHES_GSI: u32 = board::GHES_GSI;

/// What a vCPU thread needs of the architecture: the guest's MCG_CAP, for
/// the MCG_CAP reads KVM filters to user space.
#[derive(Debug, Clone, Copy)]
pub struct VcpuArch {
    mcg_cap: u64,
}

/// The value of a guest read of MSR `index` that KVM filtered to rasvmm, or
/// `None` to raise #GP.
pub fn filtered_rdmsr(arch: &VcpuArch, index: u32) -> Option<u64> {
    kvm_mce::filtered_rdmsr(index, arch.mcg_cap)
}

/// Queues an NMI on the calling vCPU `_index` (the NMI-notified GHES
/// source).
pub fn nmi(fd: &VcpuFd, _index: u8) -> Result<(), String> {
    fd.nmi().map_err(|e| e.to_string())
}

/// x86 has no synchronous external aborts (nor an SEA-notified source).
pub fn sea(_fd: &VcpuFd, _index: u8) -> Result<(), String> {
    Err("SEA is an arm64 notification".into())
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

/// The memory-error side of the machine, for the RAS controller.
pub type RasSetup = McaSetup;

/// The irqchip rasvmm keeps (x86's is part of the VM).
pub struct Irqchip;

/// Creates the VM with its in-kernel irqchip, PIT and TSS.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, Error> {
    let vm = kvm
        .create_vm()
        .map_err(|e| Error::Kvm("create the VM", e))?;
    arch_vm::setup(&vm).map_err(|(what, e)| Error::Kvm(what, e))?;
    Ok(vm)
}

/// Guest RAM regions (start, length) for `mem_size` bytes.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    arch_vm::ram_regions(mem_size)
}

fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("get supported CPUID", e))
}

/// Loads the guest and its boot tables.
pub fn load(kvm: &Kvm, memory: &GuestMemoryMmap, config: &VmConfig) -> Result<Loaded, Error> {
    if config.tables != BootTables::Acpi {
        return Err(Error::Unsupported(
            "x86_64 guests boot with ACPI tables (--tables dt is for aarch64)",
        ));
    }
    let supported = supported_cpuid(kvm)?;
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
    let l = loader::load(memory, image, machine).map_err(Error::Load)?;
    Ok(Loaded {
        entry: l.entry,
        boot_arg: 0,
        ghes_sources: l.ghes_sources,
        firmware: l.firmware,
        einj: l.einj,
    })
}

/// Creates and configures every vCPU (CPUID, machine-check banks,
/// registers) before any runs: a boot CPU that ran while an AP was still
/// being configured could have its INIT/SIPI'd AP overwritten with the
/// 64-bit entry state.
pub fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    config: &VmConfig,
    loaded: &Loaded,
) -> Result<(Vec<Prepared>, RasSetup), Error> {
    let supported = supported_cpuid(kvm)?;
    let vendor = match config.cpu.vendor {
        cpuid::Vendor::Intel => Vendor::Intel,
        cpuid::Vendor::Amd => Vendor::Amd,
    };
    let wanted_cap = mce::mcg_cap(kvm_mce::cap_supported(kvm), kvm_mce::max_banks(kvm));
    let mut mca = McaSetup {
        mcg_cap: wanted_cap,
        mcg_cap_supplied: 0,
        supply_error: None,
        vendor,
    };
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
            kvm_mce::setup(&fd, i, wanted_cap).map_err(|e| Error::Ras(i, e))?;
            let effective = kvm_mce::effective_cap(&fd, i).map_err(|e| Error::Ras(i, e))?;
            if i == 0 {
                // Decided once: the filter is VM-wide. A KVM without it
                // leaves the guest without those bits, and ras_limitation
                // says why.
                mca.mcg_cap_supplied = mce::supplied_cap_bits(vendor, wanted_cap, effective);
                if mca.mcg_cap_supplied != 0 {
                    let guest_cap = effective | mca.mcg_cap_supplied;
                    if let Err(e) = kvm_mce::serve_mcg_cap_reads(kvm, vm, guest_cap) {
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
            arch: VcpuArch {
                mcg_cap: mca.mcg_cap,
            },
        });
    }
    Ok((prepared, mca))
}

/// Nothing to do once the vCPUs exist: the irqchip came with the VM.
pub fn create_irqchip(_vm: &VmFd) -> Result<Irqchip, Error> {
    Ok(Irqchip)
}

/// The devices: on port I/O COM1 (console), COM2 (agent), the i8042 reset
/// line, CMOS and the ACPI power device; on MMIO the EINJ window.
pub fn create_devices(
    vm: &VmFd,
    config: &VmConfig,
    loaded: &Loaded,
    tx: &EventSender,
) -> Result<Devices, Error> {
    let mut bus = Bus::new();
    let place = |bus: &mut Bus, slot: board::Slot, dev| {
        bus.insert(slot.base, slot.len, dev).map_err(Error::Bus)
    };
    let console = SerialPort::new(
        irqfd(vm, board::CONSOLE_UART.gsi)?,
        ConsoleOut::new(console_target(config)?, tx.clone()),
    );
    place(&mut bus, board::CONSOLE_UART, Arc::new(Mutex::new(console)))?;
    let agent = Arc::new(Mutex::new(
        AgentPort::new::<SerialPort<AgentOut>>(irqfd(vm, board::AGENT_UART.gsi)?, tx.clone())
            .map_err(Error::EventFd)?,
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
    // Every other device is on port I/O; the EINJ window's data structure
    // must be memory the OS maps (ACPI 5 SET_ERROR_TYPE_WITH_ADDRESS).
    let mut mmio = Bus::new();
    let einj = super::einj_device(&mut mmio, loaded, tx)?;
    Ok(Devices {
        pio: bus,
        mmio,
        agent,
        einj,
    })
}
