//! The arm64 machine: vCPUs initialised with PSCI 0.2 (KVM serves PSCI, so
//! SYSTEM_OFF and SYSTEM_RESET arrive as system events), the in-kernel
//! GICv3 created once every vCPU exists, two PL011 UARTs on MMIO, and the
//! Image loaded with a device tree, EFI stub tables and ACPI tables
//! (arch::aarch64::loader). Memory errors reach the guest as synchronous
//! external aborts ([`arch::aarch64::sea`]) and GHES records.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::aarch64::firmware::BootMode;
use arch::aarch64::{gic, layout, loader, regs, sea};
use devices::bus::Bus;
use devices::legacy::Pl011;
use kvm_ioctls::{DeviceFd, Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use super::{console_target, irqfd, Devices, Error, Loaded, Prepared};
use crate::agent::{AgentOut, AgentPort};
use crate::config::{BootSource, BootTables, VmConfig};
use crate::console::ConsoleOut;
use crate::event::EventSender;

pub use arch::aarch64::regs::describe;

/// The loader's errors.
pub type LoadError = loader::Error;
/// A vCPU set-up error.
pub type VcpuError = regs::Error;
/// An interrupt-controller error.
pub type IrqchipError = gic::Error;
/// A set-up error of the memory-error plumbing.
pub type RasSetupError = sea::Error;
/// Why a vCPU could not take an SEA.
pub type DeliveryError = sea::Error;

/// The GSI (KVM irqfd numbering: SPI n) the GHES error interrupt is raised on.
pub const GHES_GSI: u32 = layout::GHES_SPI;

/// What a vCPU thread needs of the architecture: nothing.
#[derive(Debug, Clone, Copy)]
pub struct VcpuArch;

/// arm64 has no MSRs.
pub fn filtered_rdmsr(_arch: &VcpuArch, _index: u32) -> Option<u64> {
    None
}

/// arm64 has no NMI-notified GHES sources.
pub fn nmi(_fd: &VcpuFd, _index: u8) -> Result<(), String> {
    Err("arm64 has no NMIs".into())
}

/// Makes vCPU `index` (the calling thread's) take a synchronous external
/// abort when it next runs.
pub fn sea(fd: &VcpuFd, index: u8) -> Result<(), String> {
    sea::inject(fd, index).map_err(|e| e.to_string())
}

/// The memory-error side of the machine, for the RAS controller.
#[derive(Debug, Default)]
pub struct RasSetup {
    /// Whether KVM can inject external data aborts (SEA).
    pub sea: bool,
    /// When each page's consuming access first found the SEA error source
    /// busy with another vCPU's record.
    pub waits: Mutex<BTreeMap<u64, Instant>>,
}

/// The GICv3, kept open for the VM's life.
pub struct Irqchip(#[allow(dead_code)] DeviceFd);

/// Creates the VM (KVM's default IPA size covers rasvmm's RAM).
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, Error> {
    kvm.create_vm().map_err(|e| Error::Kvm("create the VM", e))
}

/// Guest RAM regions (start, length) for `mem_size` bytes.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    layout::ram_regions(mem_size)
}

/// Loads the Image and its firmware tables.
pub fn load(_kvm: &Kvm, memory: &GuestMemoryMmap, config: &VmConfig) -> Result<Loaded, Error> {
    let BootSource::Linux {
        kernel,
        initramfs,
        cmdline,
    } = &config.boot
    else {
        return Err(Error::Load(loader::Error::NoPayloads));
    };
    let l = loader::load(
        memory,
        loader::Image {
            kernel,
            initramfs: initramfs.as_deref(),
            cmdline,
        },
        loader::Machine {
            mem_size: config.memory_mib << 20,
            vcpus: config.vcpus,
            mode: match config.tables {
                BootTables::Acpi => BootMode::Acpi,
                BootTables::DeviceTree => BootMode::DeviceTree,
            },
        },
    )
    .map_err(Error::Load)?;
    Ok(Loaded {
        entry: l.entry,
        boot_arg: l.fdt,
        // A device-tree guest has no APEI: no sources to report through.
        ghes_sources: (!l.ghes_sources.is_empty()).then_some(l.ghes_sources),
        firmware: l.firmware,
        einj: l.einj,
    })
}

/// Creates and initialises every vCPU before any runs: the boot vCPU at
/// the Image's entry with x0 = the device tree, the others powered off
/// until the guest's PSCI CPU_ON.
pub fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    config: &VmConfig,
    loaded: &Loaded,
) -> Result<(Vec<Prepared>, RasSetup), Error> {
    let mut prepared = Vec::with_capacity(usize::from(config.vcpus));
    for i in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(i))
            .map_err(|e| Error::Kvm("create a vCPU", e))?;
        regs::init_vcpu(vm, &fd, i).map_err(|e| Error::Vcpu(i, e))?;
        if i == 0 {
            regs::setup_boot_vcpu(&fd, loaded.entry, loaded.boot_arg)
                .map_err(|e| Error::Vcpu(i, e))?;
        }
        // The firmware tables name vCPU i by MPIDR affinity i.
        let mpidr = regs::mpidr(&fd).map_err(|e| Error::Vcpu(i, e))?;
        if mpidr != layout::mpidr(i) {
            return Err(Error::Vcpu(i, regs::Error::Mpidr(mpidr, layout::mpidr(i))));
        }
        prepared.push(Prepared { fd, arch: VcpuArch });
    }
    Ok((
        prepared,
        RasSetup {
            sea: sea::supported(kvm),
            waits: Mutex::default(),
        },
    ))
}

/// The GICv3, once every vCPU exists.
pub fn create_irqchip(vm: &VmFd) -> Result<Irqchip, Error> {
    gic::create(vm).map(Irqchip).map_err(Error::Irqchip)
}

/// The devices, all on MMIO: the console and agent PL011s and the EINJ
/// window.
pub fn create_devices(
    vm: &VmFd,
    config: &VmConfig,
    loaded: &Loaded,
    tx: &EventSender,
) -> Result<Devices, Error> {
    let mut bus = Bus::new();
    let console = Pl011::new(
        irqfd(vm, layout::CONSOLE_UART.spi)?,
        ConsoleOut::new(console_target(config)?, tx.clone()),
    );
    bus.insert(
        layout::CONSOLE_UART.base,
        layout::CONSOLE_UART.len,
        Arc::new(Mutex::new(console)),
    )
    .map_err(Error::Bus)?;
    let agent = Arc::new(Mutex::new(
        AgentPort::new::<Pl011<AgentOut>>(irqfd(vm, layout::AGENT_UART.spi)?, tx.clone())
            .map_err(Error::EventFd)?,
    ));
    bus.insert(
        layout::AGENT_UART.base,
        layout::AGENT_UART.len,
        agent.clone(),
    )
    .map_err(Error::Bus)?;
    let einj = super::einj_device(&mut bus, loaded, tx)?;
    Ok(Devices {
        pio: Bus::new(),
        mmio: bus,
        agent,
        einj,
    })
}
