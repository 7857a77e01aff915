//! Everything a firmware-less arm64 boot puts in guest memory besides the
//! kernel and initrd, in one pure call.
//!
//! The VMM calls [`build`], writes every blob of [`Firmware::blobs`] at its
//! guest address, loads the kernel Image at [`layout::KERNEL_START`] (and the
//! initrd where it said), and starts the boot vCPU at the Image with
//! x0 = [`Firmware::fdt_addr`] (x1..x3 = 0, MMU off; Linux's arm64 boot
//! protocol). The other vCPUs are powered off and come up through PSCI.
//!
//! - [`BootMode::Acpi`]: stub DT + EFI system table and memory map + ACPI
//!   tables with the HEST, and the GHES area in its initial state; the
//!   guest runs APEI (SEA, GSIV and polled GHESv2 sources).
//! - [`BootMode::DeviceTree`]: a full DT only; no APEI.

use ras::ghes::{self, Notification, SourceLayout};
use thiserror::Error;

use super::layout::{self, Slot};
use super::{acpi, efi, fdt};

/// Smallest guest RAM accepted: the firmware area, a kernel and room to run.
pub const MIN_MEM_SIZE: u64 = 64 << 20;
/// Largest guest RAM accepted (1 TiB).
pub const MAX_MEM_SIZE: u64 = 1 << 40;
/// Guest RAM must be a whole number of 64 KiB pages (the largest arm64
/// kernel page size; the EFI map's regions must be whole kernel pages).
pub const MEM_ALIGN: u64 = 0x1_0000;

/// How the guest learns about the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// ACPI through a minimal EFI system table (APEI available).
    Acpi,
    /// A full device tree (no APEI).
    DeviceTree,
}

/// What to build for.
#[derive(Debug, Clone, Copy)]
pub struct Config<'a> {
    /// Guest RAM in bytes, from [`layout::RAM_START`].
    pub mem_size: u64,
    /// vCPUs, 1..=[`layout::MAX_VCPUS`].
    pub vcpus: u8,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// The initrd's guest range (first byte, one past the last), if any.
    pub initrd: Option<(u64, u64)>,
    /// ACPI or DT.
    pub mode: BootMode,
    /// Whether to describe the agent UART ([`layout::AGENT_UART`]). Off
    /// for a check under QEMU virt, which has its RTC there.
    pub agent_uart: bool,
}

/// Why the blobs cannot be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// vCPU count out of range.
    #[error("{0} vCPUs requested; an arm64 guest has 1 to {max}", max = layout::MAX_VCPUS)]
    Vcpus(u8),
    /// RAM size out of range or not 64 KiB aligned.
    #[error("Guest RAM of {0:#x} bytes is not a multiple of 64 KiB between 64 MiB and 1 TiB")]
    MemSize(u64),
    /// The initrd range is empty, reversed, or not in RAM above the kernel's
    /// load address.
    #[error("Initrd range {0:#x}..{1:#x} is not inside guest RAM above the kernel")]
    Initrd(u64, u64),
    /// The device tree cannot be built.
    #[error("Cannot build the device tree")]
    Fdt(#[source] fdt::Error),
    /// The EFI structures cannot be built.
    #[error("Cannot build the EFI system table and memory map")]
    Efi(#[source] efi::Error),
    /// The ACPI tables cannot be built.
    #[error("Cannot build the ACPI tables")]
    Acpi(#[source] acpi::Error),
}

/// The blobs and what the VMM needs to know about them.
#[derive(Debug)]
pub struct Firmware {
    /// (guest address, bytes): write each into guest RAM before the first
    /// vCPU runs. They never overlap each other or the kernel.
    pub blobs: Vec<(u64, Vec<u8>)>,
    /// The device tree's address: x0 of the boot vCPU.
    pub fdt_addr: u64,
    /// The GHES sources the HEST describes (empty in DT mode): give each
    /// to `ras::ghes::ErrorSource::new`. Their register area's initial
    /// state is among the blobs already, so `ErrorSource::new` rewrites
    /// the same values.
    pub ghes: Vec<SourceLayout>,
    /// Guest range (start, end) of what this module wrote: firmware-owned,
    /// never to be poisoned or handed out.
    pub firmware_range: (u64, u64),
    /// Where the kernel Image goes.
    pub kernel_addr: u64,
    /// The EINJ register window's address, if the tables offer EINJ (ACPI
    /// mode): the VMM traps it there.
    pub einj: Option<u64>,
}

/// The UARTs the tables describe: console (ttyAMA0), then agent (ttyAMA1).
pub fn uarts(agent_uart: bool) -> Vec<acpi::Uart> {
    let mut u = vec![acpi::Uart {
        name: "COM0",
        uid: 0,
        slot: layout::CONSOLE_UART,
    }];
    if agent_uart {
        u.push(acpi::Uart {
            name: "COM1",
            uid: 1,
            slot: layout::AGENT_UART,
        });
    }
    u
}

/// The GHES area's initial state (registers, empty blocks) as one blob, as
/// `ras::ghes::ErrorSource::new` leaves it: each error status address
/// register holds its block's address, each read-ack register says "ready".
pub fn ghes_area(sources: &[SourceLayout]) -> (u64, Vec<u8>) {
    let (_, used) = ghes::layout_for(&[], 0, 0);
    let len = used + u64::from(ghes::BLOCK_LEN) * sources.len() as u64;
    let mut b = vec![0u8; usize::try_from(len).unwrap_or(0)];
    let mut put = |addr: u64, v: u64| {
        let o = usize::try_from(addr - layout::GHES_START).unwrap_or(usize::MAX);
        if let Some(s) = b.get_mut(o..o.saturating_add(8)) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    };
    for s in sources {
        put(s.status_address, s.block);
        put(s.read_ack, ghes::READ_ACK_WRITE);
    }
    (layout::GHES_START, b)
}

fn check(cfg: &Config<'_>) -> Result<(), Error> {
    if cfg.vcpus == 0 || cfg.vcpus > layout::MAX_VCPUS {
        return Err(Error::Vcpus(cfg.vcpus));
    }
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&cfg.mem_size)
        || !cfg.mem_size.is_multiple_of(MEM_ALIGN)
    {
        return Err(Error::MemSize(cfg.mem_size));
    }
    if let Some((start, end)) = cfg.initrd {
        let ram_end = layout::RAM_START + cfg.mem_size;
        if start >= end || start < layout::KERNEL_START || end > ram_end {
            return Err(Error::Initrd(start, end));
        }
    }
    Ok(())
}

/// Builds every blob for `cfg`.
pub fn build(cfg: &Config<'_>) -> Result<Firmware, Error> {
    check(cfg)?;
    let uarts = uarts(cfg.agent_uart);
    match cfg.mode {
        BootMode::DeviceTree => {
            let slots: Vec<Slot> = uarts.iter().map(|u| u.slot).collect();
            let dt = fdt::full_fdt(cfg.mem_size, cfg.vcpus, &slots, cfg.cmdline, cfg.initrd)
                .map_err(Error::Fdt)?;
            let end = layout::FDT_START + dt.len() as u64;
            Ok(Firmware {
                blobs: vec![(layout::FDT_START, dt)],
                fdt_addr: layout::FDT_START,
                ghes: Vec::new(),
                firmware_range: (layout::FDT_START, end),
                kernel_addr: layout::KERNEL_START,
                // A device-tree guest has no APEI.
                einj: None,
            })
        }
        BootMode::Acpi => {
            let error_intid = layout::GHES_SPI + layout::SPI_BASE;
            let einj = Some(layout::EINJ_START);
            let (sources, used) =
                ghes::layout_for(&Notification::AARCH64, layout::GHES_START, error_intid);
            debug_assert!(used <= layout::GHES_SIZE);
            let tables = acpi::build(&acpi::Platform {
                vcpus: cfg.vcpus,
                uarts: &uarts,
                ghes: &sources,
                error_intid: Some(error_intid),
                einj,
            })
            .map_err(Error::Acpi)?;
            let map = efi::memory_map(
                layout::RAM_START,
                cfg.mem_size,
                (layout::RAM_START, layout::GHES_START),
                (layout::GHES_START, layout::GHES_START + layout::GHES_SIZE),
            )
            .map_err(Error::Efi)?;
            let e = efi::build(layout::EFI_START, layout::EFI_SIZE, tables.rsdp, &map)
                .map_err(Error::Efi)?;
            let dt = fdt::stub_fdt(
                cfg.cmdline,
                cfg.initrd,
                &fdt::UefiParams {
                    system_table: e.system_table,
                    mmap_start: e.mmap_start,
                    mmap_size: e.mmap_size,
                    desc_size: efi::MEMORY_DESCRIPTOR_SIZE,
                    desc_version: efi::MEMORY_DESCRIPTOR_VERSION,
                },
            )
            .map_err(Error::Fdt)?;
            let mut blobs = vec![(layout::FDT_START, dt), (e.base, e.bytes)];
            blobs.extend(tables.blobs);
            blobs.push(ghes_area(&sources));
            Ok(Firmware {
                blobs,
                fdt_addr: layout::FDT_START,
                ghes: sources,
                firmware_range: (layout::RAM_START, layout::GHES_START + layout::GHES_SIZE),
                kernel_addr: layout::KERNEL_START,
                einj,
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn cfg(mode: BootMode) -> Config<'static> {
        Config {
            mem_size: 512 << 20,
            vcpus: 2,
            cmdline: "console=ttyAMA0",
            initrd: Some((0x4800_0000, 0x4810_0000)),
            mode,
            agent_uart: true,
        }
    }

    fn no_overlap(blobs: &[(u64, Vec<u8>)]) {
        let mut r: Vec<(u64, u64)> = blobs
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        r.sort_unstable();
        assert!(r.windows(2).all(|w| w[0].1 <= w[1].0), "{r:x?}");
    }

    #[test]
    fn acpi_boot_blobs() {
        let f = build(&cfg(BootMode::Acpi)).unwrap();
        assert_eq!(f.fdt_addr, 0x4000_0000);
        assert_eq!(f.kernel_addr, 0x4020_0000);
        no_overlap(&f.blobs);
        for (a, b) in &f.blobs {
            assert!(*a >= f.firmware_range.0 && a + b.len() as u64 <= f.firmware_range.1);
        }
        assert!(f.firmware_range.1 <= f.kernel_addr);
        let kinds: Vec<_> = f.ghes.iter().map(|s| s.notify).collect();
        assert_eq!(kinds, Notification::AARCH64);
        assert!(f.ghes.iter().all(|s| s.gsi == 35));
        // The tables offer EINJ, whose window the VMM must trap.
        assert_eq!(f.einj, Some(layout::EINJ_START));
        // The GHES area's registers point at the blocks.
        let (base, g) = f
            .blobs
            .iter()
            .find(|(a, _)| *a == layout::GHES_START)
            .unwrap();
        let s = &f.ghes[1];
        let o = (s.status_address - base) as usize;
        assert_eq!(u64::from_le_bytes(g[o..o + 8].try_into().unwrap()), s.block);
        let o = (s.read_ack - base) as usize;
        assert_eq!(u64::from_le_bytes(g[o..o + 8].try_into().unwrap()), 1);
        assert_eq!(g.len() as u64, 0x4000);
        // The stub DT's system table is the EFI blob, whose RSDP is the
        // ACPI area's start.
        let (_, dt) = &f.blobs[0];
        let t = ::fdt::Fdt::new(dt).unwrap();
        let st = t
            .find_node("/chosen")
            .unwrap()
            .property("linux,uefi-system-table")
            .unwrap();
        assert_eq!(st.value, layout::EFI_START.to_be_bytes());
        let (_, e) = f
            .blobs
            .iter()
            .find(|(a, _)| *a == layout::EFI_START)
            .unwrap();
        assert_eq!(&e[0x80 + 16..0x80 + 24], &layout::ACPI_START.to_le_bytes());
    }

    #[test]
    fn dt_boot_blobs() {
        let f = build(&cfg(BootMode::DeviceTree)).unwrap();
        assert_eq!(f.blobs.len(), 1);
        assert!(f.ghes.is_empty());
        assert_eq!(f.einj, None);
        assert_eq!(f.firmware_range.0, layout::FDT_START);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut c = cfg(BootMode::Acpi);
        c.vcpus = 0;
        assert_eq!(build(&c).unwrap_err(), Error::Vcpus(0));
        c.vcpus = 9;
        assert_eq!(build(&c).unwrap_err(), Error::Vcpus(9));
        c.vcpus = 1;
        c.mem_size = (512 << 20) + 0x1000;
        assert!(matches!(build(&c), Err(Error::MemSize(_))));
        c.mem_size = 32 << 20;
        assert!(matches!(build(&c), Err(Error::MemSize(_))));
        c.mem_size = 512 << 20;
        c.initrd = Some((0x4000_0000, 0x4000_1000));
        assert!(matches!(build(&c), Err(Error::Initrd(..))));
        c.initrd = Some((0x5000_0000, 0x7000_0000));
        assert!(matches!(build(&c), Err(Error::Initrd(..))));
        c.initrd = Some((0x5000_0000, 0x5000_0000));
        assert!(matches!(build(&c), Err(Error::Initrd(..))));
        c.initrd = None;
        c.cmdline = "bad\0cmdline";
        assert!(matches!(build(&c), Err(Error::Fdt(_))));
    }
}
