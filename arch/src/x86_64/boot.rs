//! The Linux x86 boot protocol: zero page, e820 map and initramfs placement.
//!
//! See Documentation/arch/x86/boot.rst. Everything here is pure: it computes
//! what goes into guest memory and leaves the writing to the caller.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use thiserror::Error;

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIGH_RAM_START, MMIO_HOLE_END, MMIO_HOLE_START,
};

/// e820 type for usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type for reserved memory.
pub const E820_RESERVED: u32 = 2;
/// e820 type for ACPI tables (reclaimable once parsed).
pub const E820_ACPI: u32 = 3;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// Boot protocol 2.06 introduced `cmdline_size`.
const BOOT_PROTOCOL_CMDLINE_SIZE: u16 = 0x0206;
/// `initrd_addr_max` before protocol 2.03.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors computing the boot layout.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// The command line does not fit what the kernel accepts.
    #[error("Kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Length of the command line without its NUL.
        len: usize,
        /// Longest accepted, without the NUL.
        max: usize,
    },
    /// The initramfs does not fit below the kernel's limit.
    #[error(
        "Initramfs of {size} bytes does not fit in guest RAM below {limit:#x} above the kernel"
    )]
    InitrdTooLarge {
        /// Size of the initramfs.
        size: u64,
        /// Highest address the initramfs may end at.
        limit: u64,
    },
    /// Too many e820 entries for the zero page.
    #[error("Too many e820 entries")]
    E820Full,
}

/// Longest command line (without its NUL) the kernel with `hdr` accepts.
pub fn max_cmdline_len(hdr: Option<&setup_header>) -> usize {
    let kernel_max = match hdr {
        Some(h) if h.version >= BOOT_PROTOCOL_CMDLINE_SIZE && h.cmdline_size > 0 => {
            usize::try_from(h.cmdline_size).unwrap_or(usize::MAX)
        }
        _ => CMDLINE_MAX_SIZE - 1,
    };
    kernel_max.min(CMDLINE_MAX_SIZE - 1)
}

/// Checks a command line's length against the kernel's limit.
pub fn check_cmdline(cmdline: &str, hdr: Option<&setup_header>) -> Result<(), Error> {
    let max = max_cmdline_len(hdr);
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// Where to load an initramfs of `size` bytes: as high as the kernel allows,
/// page-aligned, above `kernel_end` and inside low RAM.
pub fn initrd_address(
    hdr: Option<&setup_header>,
    mem_size: u64,
    kernel_end: u64,
    size: u64,
) -> Result<u64, Error> {
    let addr_max = match hdr {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let low_ram_end = mem_size.min(MMIO_HOLE_START);
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let too_large = Error::InitrdTooLarge { size, limit };
    let start = limit.checked_sub(size).ok_or(too_large.clone())? & !0xfff;
    if start < kernel_end.max(HIGH_RAM_START) {
        return Err(too_large);
    }
    Ok(start)
}

/// The e820 map for a guest with `mem_size` bytes of RAM laid out by
/// [`super::layout::ram_regions`], plus firmware ranges (start, length,
/// type) such as ACPI tables or GHES error status blocks: a range inside RAM
/// is carved out of it, a range outside RAM is listed as given.
pub fn e820_map(mem_size: u64, firmware: &[(u64, u64, u32)]) -> Vec<boot_e820_entry> {
    let mut ram = vec![(0, EBDA_START)];
    let low_end = mem_size.min(MMIO_HOLE_START);
    ram.push((HIGH_RAM_START, low_end - HIGH_RAM_START));
    if mem_size > MMIO_HOLE_START {
        ram.push((MMIO_HOLE_END, mem_size - MMIO_HOLE_START));
    }
    let mut out: Vec<boot_e820_entry> = Vec::new();
    for (start, len) in &ram {
        let (start, end) = (*start, start + len);
        let mut cursor = start;
        let mut cuts: Vec<&(u64, u64, u32)> = firmware
            .iter()
            .filter(|(s, l, _)| *s < end && s + l > start)
            .collect();
        cuts.sort_unstable();
        for (s, l, t) in cuts {
            let (s, e) = ((*s).max(start), (s + l).min(end));
            if s > cursor {
                out.push(entry(cursor, s - cursor, E820_RAM));
            }
            out.push(entry(s, e - s, *t));
            cursor = cursor.max(e);
        }
        if end > cursor {
            out.push(entry(cursor, end - cursor, E820_RAM));
        }
    }
    for (s, l, t) in firmware {
        if !ram.iter().any(|(rs, rl)| *s < rs + rl && s + l > *rs) {
            out.push(entry(*s, *l, *t));
        }
    }
    out.sort_unstable_by_key(|e| e.addr);
    out
}

fn entry(addr: u64, size: u64, type_: u32) -> boot_e820_entry {
    boot_e820_entry {
        addr,
        size,
        r#type: type_,
    }
}

/// What the zero page must say.
pub struct BootSpec<'a> {
    /// The kernel's own setup header (bzImage), if any.
    pub hdr: Option<&'a setup_header>,
    /// Command line length without its NUL.
    pub cmdline_len: usize,
    /// Initramfs (address, size), if any.
    pub initrd: Option<(u64, u64)>,
    /// The e820 map.
    pub e820: &'a [boot_e820_entry],
    /// The ACPI RSDP's address, if the guest has ACPI tables.
    pub acpi_rsdp: Option<u64>,
}

/// Builds the zero page.
pub fn boot_params(spec: &BootSpec<'_>) -> Result<boot_params, Error> {
    let mut params = boot_params::default();
    if let Some(hdr) = spec.hdr {
        params.hdr = *hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = low32(CMDLINE_START);
    params.hdr.cmdline_size = u32::try_from(spec.cmdline_len + 1).unwrap_or(u32::MAX);
    if let Some((addr, size)) = spec.initrd {
        params.hdr.ramdisk_image = low32(addr);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(u32::MAX);
    }
    if let Some(rsdp) = spec.acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    if spec.e820.len() > params.e820_table.len() {
        return Err(Error::E820Full);
    }
    for (slot, e) in params.e820_table.iter_mut().zip(spec.e820) {
        *slot = *e;
    }
    params.e820_entries = u8::try_from(spec.e820.len()).map_err(|_| Error::E820Full)?;
    Ok(params)
}

/// Addresses the boot protocol stores in 32-bit fields all lie below 4 GiB.
fn low32(addr: u64) -> u32 {
    debug_assert!(addr < MMIO_HOLE_END);
    u32::try_from(addr).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(version: u16, cmdline_size: u32, initrd_addr_max: u32) -> setup_header {
        setup_header {
            version,
            cmdline_size,
            initrd_addr_max,
            ..Default::default()
        }
    }

    #[test]
    fn cmdline_limit_follows_the_kernel_header() {
        let h = hdr(0x020f, 255, 0);
        assert_eq!(max_cmdline_len(Some(&h)), 255);
        assert!(check_cmdline(&"a".repeat(255), Some(&h)).is_ok());
        assert_eq!(
            check_cmdline(&"a".repeat(256), Some(&h)),
            Err(Error::CmdlineTooLong { len: 256, max: 255 })
        );
        // Old protocol, or no header (ELF): the zero-page area limit.
        assert_eq!(max_cmdline_len(Some(&hdr(0x0205, 255, 0))), 2047);
        assert_eq!(max_cmdline_len(None), 2047);
        // Never beyond the space reserved at CMDLINE_START.
        assert_eq!(max_cmdline_len(Some(&hdr(0x020f, 1 << 20, 0))), 2047);
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let h = hdr(0x020f, 2047, 0x7fff_ffff);
        let a = initrd_address(Some(&h), 256 << 20, 0x200_0000, 0x1234).unwrap();
        assert_eq!(a, ((256 << 20) - 0x1234) & !0xfff);
        // initrd_addr_max caps it for big guests.
        let a = initrd_address(Some(&h), 3 << 30, 0x200_0000, 0x1000).unwrap();
        assert_eq!(a, 0x8000_0000 - 0x1000);
    }

    #[test]
    fn initrd_that_overlaps_the_kernel_is_refused() {
        let h = hdr(0x020f, 2047, 0x7fff_ffff);
        let err = initrd_address(Some(&h), 64 << 20, 0x300_0000, 40 << 20).unwrap_err();
        assert!(matches!(err, Error::InitrdTooLarge { .. }));
        assert!(initrd_address(Some(&h), 64 << 20, 0, 1 << 40).is_err());
    }

    #[test]
    fn e820_has_low_ram_gap_and_high_ram() {
        let map = e820_map(5 << 30, &[]);
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, EBDA_START, E820_RAM),
                (HIGH_RAM_START, MMIO_HOLE_START - HIGH_RAM_START, E820_RAM),
                (MMIO_HOLE_END, 2 << 30, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_reserved_ranges_split_ram() {
        let map = e820_map(256 << 20, &[(0x800_0000, 0x1000, E820_RESERVED)]);
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, EBDA_START, E820_RAM),
                (HIGH_RAM_START, 0x800_0000 - HIGH_RAM_START, E820_RAM),
                (0x800_0000, 0x1000, E820_RESERVED),
                (0x800_1000, (256 << 20) - 0x800_1000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_lists_firmware_outside_ram_in_order() {
        let map = e820_map(
            64 << 20,
            &[
                (0xf_0000, 0x4000, E820_RESERVED),
                (0xe_0000, 0x1000, E820_ACPI),
            ],
        );
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, EBDA_START, E820_RAM),
                (0xe_0000, 0x1000, E820_ACPI),
                (0xf_0000, 0x4000, E820_RESERVED),
                (HIGH_RAM_START, (64 << 20) - HIGH_RAM_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_map() {
        let h = hdr(0x020f, 2047, 0x7fff_ffff);
        let map = e820_map(128 << 20, &[]);
        let p = boot_params(&BootSpec {
            hdr: Some(&h),
            cmdline_len: 10,
            initrd: Some((0x700_0000, 0x10_0000)),
            e820: &map,
            acpi_rsdp: Some(0xe_0000),
        })
        .unwrap();
        // Copy out of the packed struct before comparing.
        let (ptr, size, img, rsize) = (
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
        );
        assert_eq!(
            (ptr, size, img, rsize),
            (0x20000, 11, 0x700_0000, 0x10_0000)
        );
        let (flag, magic, loader) = (p.hdr.boot_flag, p.hdr.header, p.hdr.type_of_loader);
        assert_eq!((flag, magic, loader), (0xaa55, 0x5372_6448, 0xff));
        assert_eq!(p.e820_entries, 2);
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe_0000);
    }
}
