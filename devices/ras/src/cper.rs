//! CPER (UEFI Common Platform Error Record) memory-error records, as an
//! ACPI APEI generic hardware error source hands them to the OS.
//!
//! Layouts from the UEFI specification 2.10, appendix N (N.2.5 memory error
//! section) and ACPI 6.5, 18.3.2.7 (generic error status block and generic
//! error data entry), checked against Linux 7.3 (include/acpi/actbl1.h
//! `acpi_hest_generic_status`, `acpi_hest_generic_data_v300`;
//! include/linux/cper.h `cper_sec_mem_err`). One record is:
//!
//! | bytes | structure |
//! |---|---|
//! | 0..20 | generic error status block: block_status, raw_data_offset, raw_data_length, data_length, error_severity |
//! | 20..92 | generic error data entry, revision 0x300: section_type GUID, error_severity, revision, validation_bits, flags, error_data_length, fru_id, fru_text, timestamp |
//! | 92..172 | memory error section: validation_bits, error_status, physical_addr, physical_addr_mask, ... |
//!
//! What Linux does with it (drivers/acpi/apei/ghes.c, ghes_do_proc and
//! ghes_handle_memory_failure): the physical address must be valid
//! (CPER_MEM_VALID_PA); a recoverable record with a recoverable section goes
//! to memory_failure(); a corrected section with "threshold exceeded" is
//! soft-offlined; a fatal record panics with "GHES: Fatal hardware error".
//!
//! [`validate`] is the gate for raw records from users: it checks every
//! length and field Linux trusts, bounded by the record's own size.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A GUID in the byte order UEFI stores it (first three fields little-endian).
pub type Guid = [u8; 16];

/// Builds a [`Guid`] from its textual fields, as Linux's GUID_INIT does.
pub const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// Platform memory error section, A5BC1114-6F64-4EDE-B863-3E83ED7C83B1
/// (CPER_SEC_PLATFORM_MEM).
pub const CPER_SEC_PLATFORM_MEM: Guid = guid(
    0xa5bc_1114,
    0x6f64,
    0x4ede,
    [0xb8, 0x63, 0x3e, 0x83, 0xed, 0x7c, 0x83, 0xb1],
);

/// The section types a raw record may carry: the ones Linux 7.3's GHES
/// driver decodes (include/linux/cper.h), by name.
pub const KNOWN_SECTIONS: [(&str, Guid); 6] = [
    ("memory error", CPER_SEC_PLATFORM_MEM),
    (
        "memory error 2",
        guid(
            0x61ec_04fc,
            0x48e6,
            0xd813,
            [0x25, 0xc9, 0x8d, 0xaa, 0x44, 0x75, 0x0b, 0x12],
        ),
    ),
    (
        "generic processor",
        guid(
            0x9876_ccad,
            0x47b4,
            0x4bdb,
            [0xb6, 0x5e, 0x16, 0xf1, 0x93, 0xc4, 0xf3, 0xdb],
        ),
    ),
    (
        "x86 processor",
        guid(
            0xdc3e_a0b0,
            0xa144,
            0x4797,
            [0xb9, 0x5b, 0x53, 0xfa, 0x24, 0x2b, 0x6e, 0x1d],
        ),
    ),
    (
        "PCIe",
        guid(
            0xd995_e954,
            0xbbc1,
            0x430f,
            [0xad, 0x91, 0xb4, 0x4d, 0xcb, 0x3c, 0x6f, 0x35],
        ),
    ),
    (
        "ARM processor",
        guid(
            0xe19e_3d16,
            0xbc11,
            0x11e4,
            [0x9c, 0xaa, 0xc2, 0x05, 0x1d, 0x5d, 0x46, 0xb0],
        ),
    ),
];

/// Size of the generic error status block header.
pub const ESTATUS_LEN: usize = 20;
/// Size of a generic error data entry before revision 0x300.
pub const GDATA_LEN: usize = 64;
/// Size of a generic error data entry of revision 0x300 (with a timestamp).
pub const GDATA_V300_LEN: usize = 72;
const GDATA_V300_LEN_U32: u32 = 72;
const _: () = assert!(GDATA_V300_LEN_U32 as usize == GDATA_V300_LEN);
/// Size of the memory error section (UEFI 2.3 and later).
pub const MEM_ERR_LEN: usize = 80;
/// The same, as the 32-bit length fields carry it.
const MEM_ERR_LEN_U32: u32 = 80;
const _: () = assert!(MEM_ERR_LEN_U32 as usize == MEM_ERR_LEN);
/// Size of a named memory-error record rasvmm builds.
pub const MEMORY_RECORD_LEN: usize = ESTATUS_LEN + GDATA_V300_LEN + MEM_ERR_LEN;
/// Generic error data entry revision rasvmm writes (ACPI 6.1 and later).
pub const GDATA_REVISION: u16 = 0x0300;

/// block_status: an uncorrectable error is valid.
pub const BLOCK_STATUS_UNCORRECTABLE: u32 = 1 << 0;
/// block_status: a correctable error is valid.
pub const BLOCK_STATUS_CORRECTABLE: u32 = 1 << 1;
/// block_status: the error data entry count, bits 13:4.
pub const BLOCK_STATUS_ENTRY_COUNT_SHIFT: u32 = 4;
const BLOCK_STATUS_ENTRY_COUNT_MASK: u32 = 0x3ff << BLOCK_STATUS_ENTRY_COUNT_SHIFT;

/// Generic error data entry flags: the error threshold was exceeded
/// (CPER_SEC_ERROR_THRESHOLD_EXCEEDED).
pub const CPER_SEC_ERROR_THRESHOLD_EXCEEDED: u8 = 0x08;
/// Memory section validation bit: physical_addr is valid.
pub const CPER_MEM_VALID_PA: u64 = 0x0002;
/// Memory section validation bit: physical_addr_mask is valid.
pub const CPER_MEM_VALID_PA_MASK: u64 = 0x0004;
/// Memory section validation bit: error_type is valid.
pub const CPER_MEM_VALID_ERROR_TYPE: u64 = 0x4000;
/// Memory error type: single-bit ECC.
pub const CPER_MEM_ERR_SINGLE_BIT_ECC: u8 = 2;
/// Memory error type: multi-bit ECC.
pub const CPER_MEM_ERR_MULTI_BIT_ECC: u8 = 3;

/// Largest record rasvmm accepts (and the size of each error status block).
pub const MAX_RECORD_LEN: usize = 4096;

/// CPER error severity (UEFI N.2.1), used in the status block and in each
/// data entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// Uncorrected, the OS can recover (CPER_SEV_RECOVERABLE = 0).
    Recoverable,
    /// Uncorrected and fatal (CPER_SEV_FATAL = 1).
    Fatal,
    /// Corrected by hardware (CPER_SEV_CORRECTED = 2).
    Corrected,
    /// Informational (CPER_SEV_INFORMATIONAL = 3).
    Informational,
}

impl Severity {
    /// The CPER value.
    pub fn value(self) -> u32 {
        match self {
            Severity::Recoverable => 0,
            Severity::Fatal => 1,
            Severity::Corrected => 2,
            Severity::Informational => 3,
        }
    }

    /// The severity with CPER value `v`.
    pub fn from_value(v: u32) -> Option<Self> {
        match v {
            0 => Some(Severity::Recoverable),
            1 => Some(Severity::Fatal),
            2 => Some(Severity::Corrected),
            3 => Some(Severity::Informational),
            _ => None,
        }
    }

    /// The name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Recoverable => "recoverable",
            Severity::Fatal => "fatal",
            Severity::Corrected => "corrected",
            Severity::Informational => "informational",
        }
    }

    /// Parses [`Severity::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Severity::Recoverable,
            Severity::Fatal,
            Severity::Corrected,
            Severity::Informational,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    fn block_status_bit(self) -> u32 {
        match self {
            Severity::Recoverable | Severity::Fatal => BLOCK_STATUS_UNCORRECTABLE,
            Severity::Corrected | Severity::Informational => BLOCK_STATUS_CORRECTABLE,
        }
    }
}

/// A memory error to report through GHES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryErrorRecord {
    /// Severity of the record and its one section.
    pub severity: Severity,
    /// The failing guest-physical address (the exact byte; the mask names its page).
    pub physical_addr: u64,
    /// Set the section's "error threshold exceeded" flag (corrected errors:
    /// Linux soft-offlines the page).
    pub threshold_exceeded: bool,
}

impl MemoryErrorRecord {
    /// The record's bytes: status block, one data entry, one memory section.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MEMORY_RECORD_LEN);
        // Generic error status block.
        let block_status = self.severity.block_status_bit() | (1 << BLOCK_STATUS_ENTRY_COUNT_SHIFT);
        put32(&mut out, block_status);
        put32(&mut out, 0); // raw_data_offset
        put32(&mut out, 0); // raw_data_length
        put32(&mut out, GDATA_V300_LEN_U32 + MEM_ERR_LEN_U32);
        put32(&mut out, self.severity.value());
        // Generic error data entry, revision 0x300.
        out.extend_from_slice(&CPER_SEC_PLATFORM_MEM);
        put32(&mut out, self.severity.value());
        out.extend_from_slice(&GDATA_REVISION.to_le_bytes());
        out.push(0); // validation_bits: no FRU id, text or timestamp
        out.push(if self.threshold_exceeded {
            CPER_SEC_ERROR_THRESHOLD_EXCEEDED
        } else {
            0
        });
        put32(&mut out, MEM_ERR_LEN_U32);
        out.extend_from_slice(&[0; 16]); // fru_id
        out.extend_from_slice(&[0; 20]); // fru_text
        out.extend_from_slice(&0u64.to_le_bytes()); // time_stamp
                                                    // Memory error section.
        let error_type = match self.severity {
            Severity::Corrected | Severity::Informational => CPER_MEM_ERR_SINGLE_BIT_ECC,
            Severity::Recoverable | Severity::Fatal => CPER_MEM_ERR_MULTI_BIT_ECC,
        };
        let validation = CPER_MEM_VALID_PA | CPER_MEM_VALID_PA_MASK | CPER_MEM_VALID_ERROR_TYPE;
        out.extend_from_slice(&validation.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // error_status
        out.extend_from_slice(&self.physical_addr.to_le_bytes());
        out.extend_from_slice(&(!0xfffu64).to_le_bytes()); // physical_addr_mask: a 4 KiB page
        out.extend_from_slice(&[0; 16]); // node, card, module, bank, device, row, column, bit_pos
        out.extend_from_slice(&[0; 24]); // requestor, responder, target ids
        out.push(error_type);
        out.push(0); // extended
        out.extend_from_slice(&[0; 6]); // rank, mem_array_handle, mem_dev_handle
        debug_assert_eq!(out.len(), MEMORY_RECORD_LEN);
        out
    }
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Why a raw record is refused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// Shorter than its own headers say.
    #[error("record is truncated: {what} needs {need} bytes, {have} given")]
    Truncated {
        /// The structure that does not fit.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes there are.
        have: usize,
    },
    /// Longer than an error status block.
    #[error("record is {0} bytes; an error status block holds at most {MAX_RECORD_LEN}")]
    Oversized(usize),
    /// The header's lengths disagree with the record's size.
    #[error("record is {have} bytes, longer than the {described} its header describes")]
    LengthMismatch {
        /// Size given.
        have: usize,
        /// 20 + data_length + raw_data_length.
        described: usize,
    },
    /// block_status says nothing is valid.
    #[error("block_status {0:#x} marks no error valid")]
    EmptyBlockStatus(u32),
    /// The entry count disagrees with the sections present.
    #[error("block_status counts {counted} data entries, the record holds {found}")]
    EntryCount {
        /// From block_status.
        counted: u32,
        /// Parsed.
        found: u32,
    },
    /// A severity field outside 0..=3.
    #[error("{what} severity {value} is not a CPER severity (0-3)")]
    BadSeverity {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u32,
    },
    /// raw_data_offset does not follow the data entries.
    #[error("raw_data_offset {0} does not follow the data entries")]
    RawDataOffset(u32),
    /// A memory section of the wrong size.
    #[error("memory error section is {0} bytes, expected {MEM_ERR_LEN}")]
    MemorySectionLength(u32),
    /// A memory section Linux would ignore.
    #[error("memory error section lacks a valid physical address (validation_bits {0:#x})")]
    NoPhysicalAddress(u64),
    /// A record without any data entry.
    #[error("record has no generic error data entry")]
    NoSections,
    /// A section type that is not a known CPER section.
    #[error("section type {0} is not a known CPER section")]
    UnknownSection(String),
    /// A data entry revision Linux does not know.
    #[error("data entry revision {0:#x} is not supported (0x0000-0x03ff)")]
    Revision(u16),
}

/// One data entry of a validated record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SectionSummary {
    /// The section type GUID, as text.
    pub section_type: String,
    /// Its severity.
    pub severity: Severity,
    /// For a memory error section, its physical address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub physical_addr: Option<u64>,
    /// The section's flags byte.
    pub flags: u8,
}

/// What a validated record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordSummary {
    /// The record's severity.
    pub severity: Severity,
    /// Its data entries.
    pub sections: Vec<SectionSummary>,
}

/// Formats a GUID as text (8-4-4-4-12).
pub fn guid_string(g: &Guid) -> String {
    let a = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let b = u16::from_le_bytes([g[4], g[5]]);
    let c = u16::from_le_bytes([g[6], g[7]]);
    format!(
        "{a:08x}-{b:04x}-{c:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    )
}

// Fields are read after `need` checked the length; a read past the end
// (impossible then) would yield 0, never a panic.
fn u16_at(b: &[u8], off: usize) -> u16 {
    crate::bytes::le16(b, off).unwrap_or(0)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    crate::bytes::le32(b, off).unwrap_or(0)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    crate::bytes::le64(b, off).unwrap_or(0)
}

fn need(what: &'static str, need: usize, have: usize) -> Result<(), Error> {
    if have < need {
        return Err(Error::Truncated { what, need, have });
    }
    Ok(())
}

/// Validates a raw record (status block, data entries, optional raw data)
/// before it goes into guest memory. Every field Linux trusts is checked:
/// lengths against the record's size, severities, the entry count, memory
/// sections' size and address validity. The loop is bounded by the record's
/// size, which is bounded by [`MAX_RECORD_LEN`].
pub fn validate(raw: &[u8]) -> Result<RecordSummary, Error> {
    if raw.len() > MAX_RECORD_LEN {
        return Err(Error::Oversized(raw.len()));
    }
    need("the error status block", ESTATUS_LEN, raw.len())?;
    let block_status = u32_at(raw, 0);
    let raw_data_offset = u32_at(raw, 4);
    let raw_data_length = u32_at(raw, 8) as usize;
    let data_length = u32_at(raw, 12) as usize;
    let severity_value = u32_at(raw, 16);
    let severity = Severity::from_value(severity_value).ok_or(Error::BadSeverity {
        what: "record",
        value: severity_value,
    })?;
    let described = ESTATUS_LEN
        .saturating_add(data_length)
        .saturating_add(raw_data_length);
    if described > raw.len() {
        return Err(Error::Truncated {
            what: "the record its header describes",
            need: described,
            have: raw.len(),
        });
    }
    if described != raw.len() {
        return Err(Error::LengthMismatch {
            have: raw.len(),
            described,
        });
    }
    if raw_data_length != 0 && (raw_data_offset as usize) != ESTATUS_LEN + data_length {
        return Err(Error::RawDataOffset(raw_data_offset));
    }
    if block_status & (BLOCK_STATUS_UNCORRECTABLE | BLOCK_STATUS_CORRECTABLE) == 0 {
        return Err(Error::EmptyBlockStatus(block_status));
    }
    let mut sections = Vec::new();
    let data = &raw[ESTATUS_LEN..ESTATUS_LEN + data_length];
    let mut off = 0;
    while off < data.len() {
        let rest = &data[off..];
        need("a generic error data entry", GDATA_LEN, rest.len())?;
        let revision = u16_at(rest, 20);
        if revision > 0x03ff {
            return Err(Error::Revision(revision));
        }
        let header = if revision >> 8 >= 3 {
            GDATA_V300_LEN
        } else {
            GDATA_LEN
        };
        need("a generic error data entry", header, rest.len())?;
        let sev_value = u32_at(rest, 16);
        let sec_severity = Severity::from_value(sev_value).ok_or(Error::BadSeverity {
            what: "section",
            value: sev_value,
        })?;
        let flags = rest[23];
        let len = u32_at(rest, 24);
        let total = header.saturating_add(len as usize);
        need("a section", total, rest.len())?;
        let mut section_type = [0u8; 16];
        section_type.copy_from_slice(&rest[..16]);
        if !KNOWN_SECTIONS.iter().any(|(_, g)| *g == section_type) {
            return Err(Error::UnknownSection(guid_string(&section_type)));
        }
        let payload = &rest[header..total];
        let physical_addr = if section_type == CPER_SEC_PLATFORM_MEM {
            if payload.len() != MEM_ERR_LEN {
                return Err(Error::MemorySectionLength(len));
            }
            let validation = u64_at(payload, 0);
            if validation & CPER_MEM_VALID_PA == 0 {
                return Err(Error::NoPhysicalAddress(validation));
            }
            Some(u64_at(payload, 16))
        } else {
            None
        };
        sections.push(SectionSummary {
            section_type: guid_string(&section_type),
            severity: sec_severity,
            physical_addr,
            flags,
        });
        off += total;
    }
    if sections.is_empty() {
        return Err(Error::NoSections);
    }
    let counted = (block_status & BLOCK_STATUS_ENTRY_COUNT_MASK) >> BLOCK_STATUS_ENTRY_COUNT_SHIFT;
    let found = u32::try_from(sections.len()).unwrap_or(u32::MAX);
    if counted != found {
        return Err(Error::EntryCount { counted, found });
    }
    Ok(RecordSummary { severity, sections })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(severity: Severity, threshold: bool) -> Vec<u8> {
        MemoryErrorRecord {
            severity,
            physical_addr: 0x1234_5678,
            threshold_exceeded: threshold,
        }
        .encode()
    }

    #[test]
    fn memory_guid_bytes_match_linux() {
        // GUID_INIT(0xA5BC1114, 0x6F64, 0x4EDE, 0xB8, 0x63, 0x3E, 0x83, 0xED, 0x7C, 0x83, 0xB1)
        assert_eq!(
            CPER_SEC_PLATFORM_MEM,
            [
                0x14, 0x11, 0xbc, 0xa5, 0x64, 0x6f, 0xde, 0x4e, 0xb8, 0x63, 0x3e, 0x83, 0xed, 0x7c,
                0x83, 0xb1
            ]
        );
        assert_eq!(
            guid_string(&CPER_SEC_PLATFORM_MEM),
            "a5bc1114-6f64-4ede-b863-3e83ed7c83b1"
        );
    }

    #[test]
    fn recoverable_record_layout() {
        let r = record(Severity::Recoverable, false);
        assert_eq!(r.len(), 172);
        // Status block: uncorrectable, one entry, 160 bytes of data, recoverable.
        assert_eq!(u32_at(&r, 0), 0x11);
        assert_eq!(u32_at(&r, 8), 0);
        assert_eq!(u32_at(&r, 12), 152);
        assert_eq!(u32_at(&r, 16), 0);
        // Data entry.
        assert_eq!(&r[20..36], &CPER_SEC_PLATFORM_MEM);
        assert_eq!(u32_at(&r, 36), 0);
        assert_eq!(u16_at(&r, 40), 0x300);
        assert_eq!(r[43], 0);
        assert_eq!(u32_at(&r, 44), 80);
        // Memory section at 92: PA, mask, multi-bit ECC.
        assert_eq!(u64_at(&r, 92), 0x4006);
        assert_eq!(u64_at(&r, 108), 0x1234_5678);
        assert_eq!(u64_at(&r, 116), 0xffff_ffff_ffff_f000);
        assert_eq!(r[92 + 72], CPER_MEM_ERR_MULTI_BIT_ECC);
    }

    #[test]
    fn corrected_threshold_and_fatal_records() {
        let c = record(Severity::Corrected, true);
        assert_eq!(u32_at(&c, 0), 0x12);
        assert_eq!(u32_at(&c, 16), 2);
        assert_eq!(u32_at(&c, 36), 2);
        assert_eq!(c[43], CPER_SEC_ERROR_THRESHOLD_EXCEEDED);
        assert_eq!(c[164], CPER_MEM_ERR_SINGLE_BIT_ECC);
        let f = record(Severity::Fatal, false);
        assert_eq!(u32_at(&f, 0), 0x11);
        assert_eq!(u32_at(&f, 16), 1);
    }

    #[test]
    fn named_records_validate() {
        for sev in [Severity::Recoverable, Severity::Corrected, Severity::Fatal] {
            let s = validate(&record(sev, sev == Severity::Corrected)).unwrap();
            assert_eq!(s.severity, sev);
            assert_eq!(s.sections.len(), 1);
            assert_eq!(s.sections[0].physical_addr, Some(0x1234_5678));
            assert_eq!(
                s.sections[0].section_type,
                "a5bc1114-6f64-4ede-b863-3e83ed7c83b1"
            );
        }
    }

    #[test]
    fn bad_records_are_refused() {
        let good = record(Severity::Recoverable, false);
        assert!(matches!(
            validate(&good[..10]),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            validate(&good[..171]),
            Err(Error::Truncated { need: 172, .. })
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(validate(&long), Err(Error::LengthMismatch { .. })));
        assert!(matches!(
            validate(&vec![0; MAX_RECORD_LEN + 1]),
            Err(Error::Oversized(_))
        ));
        let mut r = good.clone();
        r[16] = 9;
        assert!(matches!(
            validate(&r),
            Err(Error::BadSeverity { what: "record", .. })
        ));
        let mut r = good.clone();
        r[0] = 0x10;
        assert_eq!(validate(&r), Err(Error::EmptyBlockStatus(0x10)));
        let mut r = good.clone();
        r[0] = 0x21;
        assert_eq!(
            validate(&r),
            Err(Error::EntryCount {
                counted: 2,
                found: 1
            })
        );
        // Section length not matching the memory section.
        let mut r = good.clone();
        r[44] = 72;
        assert!(matches!(
            validate(&r),
            Err(Error::Truncated { .. }) | Err(Error::MemorySectionLength(_))
        ));
        // A damaged GUID names no CPER section.
        let mut r = good.clone();
        r[20] ^= 0xff;
        assert_eq!(
            validate(&r),
            Err(Error::UnknownSection(
                "a5bc11eb-6f64-4ede-b863-3e83ed7c83b1".into()
            ))
        );
        // Another known section type passes, without an address.
        let mut r = good.clone();
        r[20..36].copy_from_slice(&KNOWN_SECTIONS[2].1);
        assert_eq!(validate(&r).unwrap().sections[0].physical_addr, None);
        // No valid physical address.
        let mut r = good.clone();
        r[92] = 0;
        r[93] = 0x40;
        assert_eq!(validate(&r), Err(Error::NoPhysicalAddress(0x4000)));
        // Raw data offset that overlaps the entries.
        let mut r = good.clone();
        r.extend_from_slice(&[0; 8]);
        r[8] = 8;
        r[4] = 20;
        assert_eq!(validate(&r), Err(Error::RawDataOffset(20)));
        r[4] = 172;
        assert!(validate(&r).is_ok());
        // Revision beyond 0x3ff.
        let mut r = good;
        r[41] = 0x04;
        assert_eq!(validate(&r), Err(Error::Revision(0x400)));
    }

    #[test]
    fn data_length_cannot_promise_more_than_given() {
        let mut r = record(Severity::Recoverable, false);
        r[12] = 0xff;
        r[13] = 0xff;
        assert!(matches!(validate(&r), Err(Error::Truncated { .. })));
        r[12] = 0x50;
        r[13] = 0;
        assert!(matches!(validate(&r), Err(Error::LengthMismatch { .. })));
        // No data entries at all.
        let mut r = r[..20].to_vec();
        r[12] = 0;
        r[13] = 0;
        assert_eq!(validate(&r), Err(Error::NoSections));
    }
}
