//! The machine of rasvmm's own architecture, assembled from the arch
//! crate's pieces and the devices: the order KVM wants things created in,
//! which devices sit on which bus, how a vCPU is configured, and what a
//! vCPU can be asked to do for the guest's RAS (a machine check on x86, a
//! synchronous external abort on arm64).
//!
//! Each architecture implements the same items in its own file, and this
//! module picks the one rasvmm is built for; nothing above it names an
//! architecture. The vCPU threads, the RAS controller and the VM builder
//! call these items only.

use std::ops::Range;

use kvm_ioctls::VcpuFd;
use ras::ghes::SourceLayout;
use thiserror::Error;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::*;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

/// Errors assembling the machine.
#[derive(Debug, Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("Failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The guest cannot be loaded (the loader's error says what).
    #[error(transparent)]
    Load(LoadError),
    /// A vCPU cannot be set up.
    #[error("Cannot set up vCPU {0}")]
    Vcpu(u8, #[source] VcpuError),
    /// The interrupt controller cannot be set up.
    #[error("Cannot set up the interrupt controller")]
    Irqchip(#[source] IrqchipError),
    /// The memory-error plumbing of the vCPUs cannot be set up.
    #[error("Cannot set up memory-error reporting on vCPU {0}")]
    Ras(u8, #[source] RasSetupError),
    /// An eventfd cannot be created.
    #[error("Failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A console file cannot be created.
    #[error("Cannot create console file '{0}'")]
    ConsoleFile(String, #[source] std::io::Error),
    /// The configuration asks for something this architecture has not.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A device cannot be placed on the bus.
    #[error("Cannot place a device")]
    Bus(#[source] devices::bus::Error),
}

/// A guest in memory.
#[derive(Debug)]
pub struct Loaded {
    /// Where the boot vCPU starts.
    pub entry: u64,
    /// What the boot vCPU is handed (the device tree's address on arm64).
    pub boot_arg: u64,
    /// The GHESv2 error sources the HEST describes (Linux guests only).
    pub ghes_sources: Option<Vec<SourceLayout>>,
    /// Guest pages rasvmm itself reads and writes (firmware tables, GHES
    /// blocks): never to be poisoned.
    pub firmware: Range<u64>,
    /// The EINJ register window's address, if the guest's tables offer
    /// EINJ: the device goes there.
    pub einj: Option<u64>,
}

/// A vCPU created and configured, its thread not started yet.
pub struct Prepared {
    /// Its fd.
    pub fd: VcpuFd,
    /// What its thread needs to know of the architecture.
    pub arch: VcpuArch,
}

/// Work for a vCPU's own thread (a request the RAS controller sends); it
/// may return an event for the session to record.
pub type OnVcpu = Box<dyn FnOnce(&VcpuFd) -> Option<crate::event::RasEvent> + Send>;

/// The devices, placed: port I/O (x86 only), MMIO, and the agent's UART.
pub struct Devices {
    /// Port-I/O devices.
    pub pio: devices::bus::Bus,
    /// MMIO devices.
    pub mmio: devices::bus::Bus,
    /// The agent's UART (also on one of the buses).
    pub agent: std::sync::Arc<std::sync::Mutex<crate::agent::AgentPort>>,
    /// The EINJ register window (also on the MMIO bus), if the guest's
    /// tables offer EINJ (a Linux boot with ACPI tables).
    pub einj: Option<std::sync::Arc<std::sync::Mutex<crate::einj::EinjDevice>>>,
}

/// The EINJ device, placed on the MMIO bus at the window the guest's
/// tables offer (`loaded.einj`), if they offer one.
fn einj_device(
    mmio: &mut devices::bus::Bus,
    loaded: &Loaded,
    tx: &crate::event::EventSender,
) -> Result<Option<std::sync::Arc<std::sync::Mutex<crate::einj::EinjDevice>>>, Error> {
    let Some(base) = loaded.einj else {
        return Ok(None);
    };
    let einj = std::sync::Arc::new(std::sync::Mutex::new(crate::einj::EinjDevice::new(
        base,
        tx.clone(),
    )));
    mmio.insert(base, ras::einj::WINDOW_SIZE, einj.clone())
        .map_err(Error::Bus)?;
    Ok(Some(einj))
}

/// Where the guest console goes, as a writer (`None`: only the in-memory
/// log used for classification).
fn console_target(
    config: &crate::config::VmConfig,
) -> Result<Option<Box<dyn std::io::Write + Send>>, Error> {
    use crate::config::ConsoleTarget;
    Ok(match &config.console {
        ConsoleTarget::Stdout => Some(Box::new(std::io::stdout())),
        // Line-buffered: one write(2) per console line rather than per
        // character the guest prints (every one a UART exit already).
        ConsoleTarget::File(p) => Some(Box::new(std::io::LineWriter::new(
            std::fs::File::create(p).map_err(|e| Error::ConsoleFile(p.display().to_string(), e))?,
        ))),
        ConsoleTarget::Discard => None,
    })
}

/// An eventfd that raises guest interrupt `gsi` when written (KVM irqfd).
fn irqfd(vm: &kvm_ioctls::VmFd, gsi: u32) -> Result<vmm_sys_util::eventfd::EventFd, Error> {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let fd = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&fd, gsi)
        .map_err(|e| Error::Kvm("register an irqfd", e))?;
    Ok(fd)
}
