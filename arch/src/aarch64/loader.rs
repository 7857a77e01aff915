//! Puts an arm64 guest into memory: the Linux Image (linux-loader's arm64
//! Image loader, at [`layout::KERNEL_START`]), the initramfs at the top of
//! RAM, and the firmware blobs of [`firmware::build`] (device tree, EFI
//! system table and memory map, ACPI tables with the HEST, the GHES area);
//! and says where the boot vCPU starts and what x0 holds.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::pe::PE;
use linux_loader::loader::KernelLoader;
use ras::ghes::SourceLayout;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::firmware::{self, BootMode};
use super::layout;

/// Errors loading a guest.
#[derive(Debug, Error)]
pub enum Error {
    /// arm64 guests are Linux Images; flat payloads are an x86 test device.
    #[error("arm64 boots a Linux Image; flat payloads are x86-only")]
    NoPayloads,
    /// A file cannot be read.
    #[error("Cannot read {0} '{1}'")]
    Read(&'static str, String, #[source] std::io::Error),
    /// The kernel is not an arm64 Image.
    #[error("Kernel '{0}' is not a loadable arm64 Image")]
    KernelFormat(String, #[source] linux_loader::loader::Error),
    /// The initramfs does not fit above the kernel.
    #[error("Initramfs '{0}' ({1} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge(String, u64),
    /// The firmware tables cannot be built.
    #[error("Cannot build the firmware tables")]
    Firmware(#[source] firmware::Error),
    /// Writing into guest memory failed.
    #[error("Failed to write {0} into guest memory")]
    GuestMemory(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// What to boot.
#[derive(Debug, Clone, Copy)]
pub struct Image<'a> {
    /// The Image.
    pub kernel: &'a Path,
    /// Initramfs, if any.
    pub initramfs: Option<&'a Path>,
    /// Command line.
    pub cmdline: &'a str,
}

/// The machine the image is loaded for.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// ACPI (with APEI) or a device tree only.
    pub mode: BootMode,
}

/// A loaded guest.
#[derive(Debug)]
pub struct Loaded {
    /// Where the boot vCPU starts.
    pub entry: u64,
    /// The device tree's address (x0).
    pub fdt: u64,
    /// The GHESv2 error sources the HEST describes (none in DT mode).
    pub ghes_sources: Vec<SourceLayout>,
    /// Guest pages rasvmm itself reads and writes: never to be poisoned.
    pub firmware: std::ops::Range<u64>,
    /// The EINJ register window's address, if the tables offer EINJ.
    pub einj: Option<u64>,
}

/// Loads `image` into `memory` with its firmware tables.
pub fn load(memory: &GuestMemoryMmap, image: Image<'_>, m: Machine) -> Result<Loaded, Error> {
    let path = |p: &Path| p.display().to_string();
    let mut kernel =
        File::open(image.kernel).map_err(|e| Error::Read("kernel", path(image.kernel), e))?;
    let k = PE::load(
        memory,
        Some(GuestAddress(layout::KERNEL_START)),
        &mut kernel,
        None,
    )
    .map_err(|e| Error::KernelFormat(path(image.kernel), e))?;
    let ram_end = layout::RAM_START + m.mem_size;
    let initrd = match image.initramfs {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| Error::Read("initramfs", path(p), e))?;
            let len = bytes.len() as u64;
            // At the top of RAM, page-aligned, clear of the kernel's image.
            let start = ram_end
                .checked_sub(len)
                .map(|s| s & !0xfff)
                .filter(|s| *s >= k.kernel_end)
                .ok_or_else(|| Error::InitrdTooLarge(path(p), len))?;
            memory
                .write_slice(&bytes, GuestAddress(start))
                .map_err(|e| Error::GuestMemory("initramfs", e))?;
            Some((start, start + len))
        }
        None => None,
    };
    let fw = firmware::build(&firmware::Config {
        mem_size: m.mem_size,
        vcpus: m.vcpus,
        cmdline: image.cmdline,
        initrd,
        mode: m.mode,
        agent_uart: true,
    })
    .map_err(Error::Firmware)?;
    for (addr, bytes) in &fw.blobs {
        memory
            .write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| Error::GuestMemory("firmware tables", e))?;
    }
    Ok(Loaded {
        entry: k.kernel_load.0,
        fdt: fw.fdt_addr,
        ghes_sources: fw.ghes,
        firmware: fw.firmware_range.0..fw.firmware_range.1,
        einj: fw.einj,
    })
}
