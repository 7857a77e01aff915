//! The minimal UEFI structures that let arm64 Linux boot with ACPI and no
//! UEFI firmware: an EFI system table with two configuration tables (the
//! ACPI 2.0 RSDP and EFI_RT_PROPERTIES_TABLE saying that no runtime
//! service exists) and an EFI memory map that describes all of RAM.
//!
//! The stub device tree's `linux,uefi-*` properties point at them
//! ([`super::fdt`]). What Linux 7.3 reads, and so what must hold:
//! - drivers/firmware/efi/efi.c efi_systab_check_header: the signature
//!   "IBI SYST" only (the CRC is not checked; it is still filled in, as
//!   UEFI 2.10 4.2.1 asks); efi_systab_report_header maps `fw_vendor` and
//!   reads a NUL-terminated UTF-16 string: a null pointer is read as
//!   address 0. It prints "EFI v2.7 by <vendor>" for revision 2.70.
//! - efi.c efi_config_parse_tables: the configuration table array is
//!   `nr_tables` x {GUID, u64 pointer}; ACPI_20_TABLE_GUID gives the RSDP,
//!   EFI_RT_PROPERTIES_TABLE_GUID the runtime-services mask, which stays
//!   0 so Linux never calls `runtime` (left 0).
//! - drivers/firmware/efi/efi-init.c reserve_regions: the memory map
//!   replaces any /memory node; descriptors with EFI_MEMORY_WB are memory,
//!   usable if of a usable type (EfiConventionalMemory, and
//!   EfiACPIReclaimMemory which is also memblock-reserved); others, such as
//!   EfiACPIMemoryNVS, are mapped but kept out of the page allocator
//!   (nomap). Descriptor version must be 1 (a WARN otherwise).
//!
//! Layouts: UEFI 2.10, 4.2 (EFI_TABLE_HEADER), 4.3 (EFI_SYSTEM_TABLE),
//! 4.6 (EFI_CONFIGURATION_TABLE), 4.6.2 (EFI_RT_PROPERTIES_TABLE), 7.2
//! (EFI_MEMORY_DESCRIPTOR), checked against Linux 7.3 include/linux/efi.h.

use ras::cper::{guid, Guid};
use thiserror::Error;

/// "IBI SYST", EFI_SYSTEM_TABLE_SIGNATURE.
pub const EFI_SYSTEM_TABLE_SIGNATURE: u64 = u64::from_le_bytes(*b"IBI SYST");
/// UEFI 2.70 (EFI_2_70_SYSTEM_TABLE_REVISION).
pub const EFI_2_70_SYSTEM_TABLE_REVISION: u32 = (2 << 16) | 70;
/// Size of the 64-bit EFI_SYSTEM_TABLE (its header's HeaderSize).
pub const SYSTEM_TABLE_LEN: u32 = 120;
/// Size of one EFI_CONFIGURATION_TABLE entry.
pub const CONFIG_TABLE_LEN: usize = 24;
/// Size of EFI_RT_PROPERTIES_TABLE.
pub const RT_PROPERTIES_LEN: u16 = 8;
/// The memory map's descriptor stride (what firmware commonly reports;
/// the 40-byte EFI_MEMORY_DESCRIPTOR padded, as Linux allows).
pub const MEMORY_DESCRIPTOR_SIZE: u32 = 48;
const DESC_LEN: usize = MEMORY_DESCRIPTOR_SIZE as usize;
const SYSTAB_LEN: usize = SYSTEM_TABLE_LEN as usize;
/// EFI_MEMORY_DESCRIPTOR_VERSION.
pub const MEMORY_DESCRIPTOR_VERSION: u32 = 1;
/// EFI pages are 4 KiB whatever the kernel's page size.
pub const EFI_PAGE_SIZE: u64 = 0x1000;
/// EFI_MEMORY_WB: write-back cacheable.
pub const EFI_MEMORY_WB: u64 = 0x8;

/// ACPI_20_TABLE_GUID, 8868e871-e4f1-11d3-bc22-0080c73c8881.
pub const ACPI_20_TABLE_GUID: Guid = guid(
    0x8868_e871,
    0xe4f1,
    0x11d3,
    [0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c, 0x88, 0x81],
);
/// EFI_RT_PROPERTIES_TABLE_GUID, eb66918a-7eef-402a-842e-931d21c38ae9.
pub const EFI_RT_PROPERTIES_TABLE_GUID: Guid = guid(
    0xeb66_918a,
    0x7eef,
    0x402a,
    [0x84, 0x2e, 0x93, 0x1d, 0x21, 0xc3, 0x8a, 0xe9],
);

/// The firmware vendor string the system table names.
pub const FIRMWARE_VENDOR: &str = "rasvmm";

/// EFI_MEMORY_TYPE values rasvmm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryType {
    /// EfiConventionalMemory: free RAM.
    EfiConventionalMemory = 7,
    /// EfiACPIReclaimMemory: ACPI tables (and here the DT and EFI tables).
    EfiACPIReclaimMemory = 9,
    /// EfiACPIMemoryNVS: firmware-owned memory the OS must leave alone
    /// (the GHES registers and error status blocks).
    EfiACPIMemoryNVS = 10,
}

/// One EFI memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryDescriptor {
    /// Type.
    pub kind: MemoryType,
    /// First byte (4 KiB aligned).
    pub phys: u64,
    /// Number of 4 KiB pages.
    pub pages: u64,
    /// Attributes (EFI_MEMORY_WB for all of rasvmm's RAM).
    pub attribute: u64,
}

impl MemoryDescriptor {
    /// The descriptor's bytes: Type u32, pad u32, PhysicalStart,
    /// VirtualStart (0: no runtime mapping), NumberOfPages, Attribute, then
    /// zero padding to [`MEMORY_DESCRIPTOR_SIZE`].
    pub fn to_bytes(&self) -> [u8; DESC_LEN] {
        let mut b = [0u8; DESC_LEN];
        b[0..4].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.phys.to_le_bytes());
        b[24..32].copy_from_slice(&self.pages.to_le_bytes());
        b[32..40].copy_from_slice(&self.attribute.to_le_bytes());
        b
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.phys + self.pages * EFI_PAGE_SIZE
    }
}

/// Errors building the EFI structures.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// A region of the memory map is not in 4 KiB pages, or lies outside
    /// RAM.
    #[error("Memory map region {start:#x}..{end:#x} is not 4 KiB aligned inside RAM")]
    BadRegion {
        /// First byte.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// The structures outgrow their area.
    #[error("EFI structures need {need} bytes; {room} are reserved for them")]
    TooLarge {
        /// Bytes needed.
        need: u64,
        /// Bytes of the area.
        room: u64,
    },
}

/// The memory map of RAM `ram_start..ram_start + ram_size`: `reclaim` as
/// EfiACPIReclaimMemory, `nvs` as EfiACPIMemoryNVS, everything else
/// EfiConventionalMemory, all write-back. The two ranges must be 4 KiB
/// aligned, inside RAM and `reclaim` below `nvs` without overlap.
pub fn memory_map(
    ram_start: u64,
    ram_size: u64,
    reclaim: (u64, u64),
    nvs: (u64, u64),
) -> Result<Vec<MemoryDescriptor>, Error> {
    let ram_end = ram_start.checked_add(ram_size).ok_or(Error::BadRegion {
        start: ram_start,
        end: u64::MAX,
    })?;
    let aligned = |a: u64| a.is_multiple_of(EFI_PAGE_SIZE);
    for (start, end) in [(ram_start, ram_end), reclaim, nvs] {
        if !aligned(start) || !aligned(end) || start > end || start < ram_start || end > ram_end {
            return Err(Error::BadRegion { start, end });
        }
    }
    if reclaim.1 > nvs.0 {
        return Err(Error::BadRegion {
            start: nvs.0,
            end: nvs.1,
        });
    }
    let mut map = Vec::new();
    let mut push = |kind, start: u64, end: u64| {
        if end > start {
            map.push(MemoryDescriptor {
                kind,
                phys: start,
                pages: (end - start) / EFI_PAGE_SIZE,
                attribute: EFI_MEMORY_WB,
            });
        }
    };
    push(MemoryType::EfiConventionalMemory, ram_start, reclaim.0);
    push(MemoryType::EfiACPIReclaimMemory, reclaim.0, reclaim.1);
    push(MemoryType::EfiConventionalMemory, reclaim.1, nvs.0);
    push(MemoryType::EfiACPIMemoryNVS, nvs.0, nvs.1);
    push(MemoryType::EfiConventionalMemory, nvs.1, ram_end);
    Ok(map)
}

/// CRC-32 as UEFI's CalculateCrc32 (IEEE 802.3, reflected, as zlib).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// The EFI blob, placed: write `bytes` at `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfiTables {
    /// Where the blob goes.
    pub base: u64,
    /// System table, configuration tables, RT properties table, vendor
    /// string and memory map, at the offsets below.
    pub bytes: Vec<u8>,
    /// The system table's address (`linux,uefi-system-table`).
    pub system_table: u64,
    /// The memory map's address (`linux,uefi-mmap-start`).
    pub mmap_start: u64,
    /// The memory map's size in bytes (`linux,uefi-mmap-size`).
    pub mmap_size: u32,
}

/// Offsets inside the blob.
const CONFIG_OFFSET: usize = 0x80;
const RT_PROPERTIES_OFFSET: usize = 0xc0;
const VENDOR_OFFSET: usize = 0xd0;
const MMAP_OFFSET: usize = 0x100;
const _: () = assert!(SYSTAB_LEN <= CONFIG_OFFSET);
const _: () = assert!(CONFIG_OFFSET + 2 * CONFIG_TABLE_LEN <= RT_PROPERTIES_OFFSET);
const _: () = assert!(RT_PROPERTIES_OFFSET + RT_PROPERTIES_LEN as usize <= VENDOR_OFFSET);
const _: () = assert!(VENDOR_OFFSET + 2 * (FIRMWARE_VENDOR.len() + 1) <= MMAP_OFFSET);

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Builds the EFI blob for `base..base + room`: the system table pointing
/// at the RSDP `rsdp` and at an RT properties table with no runtime
/// services, and the memory map `map`.
pub fn build(
    base: u64,
    room: u64,
    rsdp: u64,
    map: &[MemoryDescriptor],
) -> Result<EfiTables, Error> {
    let mmap_len = map.len() * DESC_LEN;
    let len = MMAP_OFFSET + mmap_len;
    if len as u64 > room {
        return Err(Error::TooLarge {
            need: len as u64,
            room,
        });
    }
    let mmap_size = u32::try_from(mmap_len).map_err(|_| Error::TooLarge {
        need: len as u64,
        room,
    })?;
    let mut b = vec![0u8; len];
    let at = |off: usize| base + off as u64;

    // EFI_SYSTEM_TABLE.
    put_u64(&mut b, 0, EFI_SYSTEM_TABLE_SIGNATURE);
    put_u32(&mut b, 8, EFI_2_70_SYSTEM_TABLE_REVISION);
    put_u32(&mut b, 12, SYSTEM_TABLE_LEN); // HeaderSize
                                           // CRC32 at 16 last; Reserved at 20.
    put_u64(&mut b, 24, at(VENDOR_OFFSET)); // FirmwareVendor
    put_u32(&mut b, 32, 1); // FirmwareRevision
                            // Console handles and protocols (40..88): none.
                            // RuntimeServices (88) = 0: EFI_RT_PROPERTIES_TABLE says none exist.
                            // BootServices (96) = 0: boot services have "exited".
    put_u64(&mut b, 104, 2); // NumberOfTableEntries
    put_u64(&mut b, 112, at(CONFIG_OFFSET)); // ConfigurationTable

    // EFI_CONFIGURATION_TABLE[2].
    b[CONFIG_OFFSET..CONFIG_OFFSET + 16].copy_from_slice(&ACPI_20_TABLE_GUID);
    put_u64(&mut b, CONFIG_OFFSET + 16, rsdp);
    let rt = CONFIG_OFFSET + CONFIG_TABLE_LEN;
    b[rt..rt + 16].copy_from_slice(&EFI_RT_PROPERTIES_TABLE_GUID);
    put_u64(&mut b, rt + 16, at(RT_PROPERTIES_OFFSET));

    // EFI_RT_PROPERTIES_TABLE: Version 1, Length 8, RuntimeServicesSupported 0.
    b[RT_PROPERTIES_OFFSET..RT_PROPERTIES_OFFSET + 2].copy_from_slice(&1u16.to_le_bytes());
    b[RT_PROPERTIES_OFFSET + 2..RT_PROPERTIES_OFFSET + 4]
        .copy_from_slice(&RT_PROPERTIES_LEN.to_le_bytes());

    // The vendor, UTF-16 with its NUL (the blob is zeroed).
    for (i, u) in FIRMWARE_VENDOR.encode_utf16().enumerate() {
        let o = VENDOR_OFFSET + 2 * i;
        b[o..o + 2].copy_from_slice(&u.to_le_bytes());
    }

    for (i, d) in map.iter().enumerate() {
        let o = MMAP_OFFSET + i * DESC_LEN;
        b[o..o + DESC_LEN].copy_from_slice(&d.to_bytes());
    }

    let crc = crc32(&b[..SYSTAB_LEN]);
    put_u32(&mut b, 16, crc);
    Ok(EfiTables {
        base,
        bytes: b,
        system_table: base,
        mmap_start: at(MMAP_OFFSET),
        mmap_size,
    })
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    #[test]
    fn crc32_matches_the_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn guids_are_stored_as_uefi_does() {
        // 8868e871-e4f1-11d3-bc22-0080c73c8881: first three fields LE.
        assert_eq!(
            ACPI_20_TABLE_GUID,
            [
                0x71, 0xe8, 0x68, 0x88, 0xf1, 0xe4, 0xd3, 0x11, 0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c,
                0x88, 0x81
            ]
        );
        assert_eq!(
            &EFI_RT_PROPERTIES_TABLE_GUID[..4],
            &[0x8a, 0x91, 0x66, 0xeb]
        );
    }

    fn map() -> Vec<MemoryDescriptor> {
        memory_map(
            0x4000_0000,
            512 << 20,
            (0x4000_0000, 0x4004_0000),
            (0x4004_0000, 0x4005_0000),
        )
        .unwrap()
    }

    #[test]
    fn memory_map_covers_ram_without_overlap() {
        let m = map();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].kind, MemoryType::EfiACPIReclaimMemory);
        assert_eq!(m[1].kind, MemoryType::EfiACPIMemoryNVS);
        assert_eq!(m[2].kind, MemoryType::EfiConventionalMemory);
        assert_eq!(m[0].phys, 0x4000_0000);
        for w in m.windows(2) {
            assert_eq!(w[0].end(), w[1].phys, "contiguous, no overlap");
        }
        assert_eq!(m[2].end(), 0x4000_0000 + (512 << 20));
        assert!(m.iter().all(|d| d.attribute == EFI_MEMORY_WB));
        let total: u64 = m.iter().map(|d| d.pages * EFI_PAGE_SIZE).sum();
        assert_eq!(total, 512 << 20);
    }

    #[test]
    fn memory_map_refuses_bad_regions() {
        let r = (0x4000_0000, 0x4004_0000);
        assert!(memory_map(0x4000_0000, 0x3_0000, r, (0x4004_0000, 0x4005_0000)).is_err());
        assert!(memory_map(0x4000_0000, 1 << 30, r, (0x4004_0800, 0x4005_0000)).is_err());
        assert!(memory_map(
            0x4000_0000,
            1 << 30,
            (0x4000_0000, 0x4006_0000),
            (0x4004_0000, 0x4005_0000)
        )
        .is_err());
        assert!(memory_map(u64::MAX - 0xfff, 0x2000, r, r).is_err());
    }

    #[test]
    fn descriptor_layout() {
        let d = MemoryDescriptor {
            kind: MemoryType::EfiACPIMemoryNVS,
            phys: 0x4004_0000,
            pages: 16,
            attribute: EFI_MEMORY_WB,
        }
        .to_bytes();
        assert_eq!(u32_at(&d, 0), 10);
        assert_eq!(u32_at(&d, 4), 0);
        assert_eq!(u64_at(&d, 8), 0x4004_0000);
        assert_eq!(u64_at(&d, 16), 0, "VirtualStart");
        assert_eq!(u64_at(&d, 24), 16);
        assert_eq!(u64_at(&d, 32), 8);
        assert_eq!(&d[40..], &[0; 8]);
    }

    #[test]
    fn system_table_fields() {
        let t = build(0x4001_0000, 0x1_0000, 0x4002_0000, &map()).unwrap();
        let b = &t.bytes;
        assert_eq!(t.system_table, 0x4001_0000);
        assert_eq!(&b[0..8], b"IBI SYST");
        assert_eq!(u32_at(b, 8), 0x0002_0046);
        assert_eq!(u32_at(b, 12), 120);
        // The CRC covers HeaderSize bytes with the CRC field zero.
        let mut h = b[..120].to_vec();
        h[16..20].fill(0);
        assert_eq!(u32_at(b, 16), crc32(&h));
        // Vendor string: UTF-16 "rasvmm", NUL-terminated.
        let v = (u64_at(b, 24) - t.base) as usize;
        let s: Vec<u16> = (0..)
            .map(|i| u16::from_le_bytes([b[v + 2 * i], b[v + 2 * i + 1]]))
            .take_while(|c| *c != 0)
            .collect();
        assert_eq!(String::from_utf16(&s).unwrap(), FIRMWARE_VENDOR);
        assert_eq!(u64_at(b, 88), 0, "no runtime services");
        assert_eq!(u64_at(b, 104), 2);
        let c = (u64_at(b, 112) - t.base) as usize;
        assert_eq!(&b[c..c + 16], &ACPI_20_TABLE_GUID);
        assert_eq!(u64_at(b, c + 16), 0x4002_0000);
        assert_eq!(&b[c + 24..c + 40], &EFI_RT_PROPERTIES_TABLE_GUID);
        let rt = (u64_at(b, c + 40) - t.base) as usize;
        assert_eq!(&b[rt..rt + 8], &[1, 0, 8, 0, 0, 0, 0, 0]);
        // The memory map.
        assert_eq!(t.mmap_size, 3 * 48);
        let m = (t.mmap_start - t.base) as usize;
        assert_eq!(&b[m..m + 48], &map()[0].to_bytes());
        assert_eq!(b.len(), m + 3 * 48);
        assert_eq!(
            build(0, 0x100, 0, &map()),
            Err(Error::TooLarge {
                need: 0x100 + 144,
                room: 0x100
            })
        );
    }
}
