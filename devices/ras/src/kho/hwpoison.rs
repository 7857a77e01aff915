//! The `hwpoison` blob, ABI v2 (the contract between guest-kernel-patches
//! v2 and rasvmm's observer), little-endian:
//!
//! | offset | field |
//! |---|---|
//! | 0 | u32 magic "HWPN" |
//! | 4 | u16 version = major << 8 \| minor (2.0 = 0x0200) |
//! | 6 | u16 flags: bit 0 INCOMPLETE; bits 1-15 reserved, zero in minor 0 |
//! | 8 | u32 nr_entries: valid entries |
//! | 12 | u32 capacity: blob-size == 24 + capacity * 8 exactly |
//! | 16 | u64 seq: even when stable, odd while the kernel updates the list |
//! | 24 | u64 entries[capacity]: bits 0-55 PFN, bits 56-63 type |
//!
//! Types: 1 hardware, 2 simulated, 3 soft-offline. Minor 0 knows no other
//! type and no other flag; a later minor may add both, so its unknown flags
//! are ignored and its unknown types are kept as hardware, flagged. Type 0
//! is invalid in every minor. An outgoing kernel writes no duplicates and
//! no PFN whose address wraps; the incoming kernel drops such entries, and
//! so does this parser, each reported with its problem.

use serde::{Deserialize, Serialize};

use super::{
    Error, HWPOISON_F_INCOMPLETE, HWPOISON_HEADER_LEN, HWPOISON_MAGIC, HWPOISON_MAJOR,
    HWPOISON_MINOR, HWPOISON_PFN_MASK,
};
use crate::bytes::{le16, le32, le64};

/// Why the kernel poisoned a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryType {
    /// memory_failure() for a real hardware report.
    Hardware,
    /// memory_failure() with MF_SW_SIMULATED (hwpoison-inject,
    /// madvise(MADV_HWPOISON)).
    Simulated,
    /// soft_offline_page().
    SoftOffline,
    /// A type a later minor version added: kept out of service as hardware.
    Unknown(u8),
}

impl EntryType {
    /// The type byte as the blob stores it.
    pub fn byte(self) -> u8 {
        match self {
            EntryType::Hardware => 1,
            EntryType::Simulated => 2,
            EntryType::SoftOffline => 3,
            EntryType::Unknown(t) => t,
        }
    }

    /// The type of byte `t` for a blob of minor version `minor`; `None` if
    /// that minor makes it invalid.
    pub fn of(t: u8, minor: u8) -> Option<Self> {
        match t {
            1 => Some(EntryType::Hardware),
            2 => Some(EntryType::Simulated),
            3 => Some(EntryType::SoftOffline),
            0 => None,
            t if minor > HWPOISON_MINOR => Some(EntryType::Unknown(t)),
            _ => None,
        }
    }
}

/// One valid entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Entry {
    /// The page frame number.
    pub pfn: u64,
    /// Why it is poisoned.
    #[serde(rename = "type")]
    pub kind: EntryType,
}

impl Entry {
    /// The entry as the blob stores it.
    pub fn raw(self) -> u64 {
        (u64::from(self.kind.byte()) << 56) | (self.pfn & HWPOISON_PFN_MASK)
    }
}

/// Why an entry is dropped (as the incoming kernel drops it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryProblem {
    /// A type byte this minor version does not define.
    #[error("invalid type {0}")]
    InvalidType(u8),
    /// PFN << 12 does not fit 64 bits.
    #[error("physical address wraps (PFN >= 2^52)")]
    AddressWraps,
    /// The PFN was listed before.
    #[error("duplicate PFN")]
    Duplicate,
    /// The page is not RAM (of the guest the caller describes).
    #[error("outside guest RAM")]
    OutsideRam,
}

/// An entry that was dropped, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RejectedEntry {
    /// Its index in the blob.
    pub index: u32,
    /// The raw u64.
    pub raw: u64,
    /// Its PFN bits.
    pub pfn: u64,
    /// Why it is dropped.
    pub problem: EntryProblem,
}

/// A parsed hwpoison blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HwpoisonList {
    /// The raw version field (major << 8 | minor).
    pub version: u16,
    /// The raw flags.
    pub flags: u16,
    /// INCOMPLETE: the list lacks pages some kernel in the chain knew of.
    pub incomplete: bool,
    /// Flags a later minor version defined (ignored).
    pub unknown_flags: u16,
    /// The update sequence number.
    pub seq: u64,
    /// The valid entries, sorted by PFN, each PFN once (the first listed).
    pub entries: Vec<Entry>,
    /// Entries dropped as duplicates.
    pub duplicates: u32,
    /// Every dropped entry, in blob order.
    pub rejected: Vec<RejectedEntry>,
}

impl HwpoisonList {
    /// Parses a blob of exactly its `blob-size` bytes.
    pub fn parse(blob: &[u8]) -> Result<Self, Error> {
        Self::parse_in(blob, |_| true)
    }

    /// Parses a blob of exactly its `blob-size` bytes, rejecting entries
    /// whose page `is_ram` says is not RAM.
    pub fn parse_in(blob: &[u8], is_ram: impl Fn(u64) -> bool) -> Result<Self, Error> {
        if blob.len() < HWPOISON_HEADER_LEN {
            return Err(Error::Hwpoison("shorter than its header"));
        }
        if le32(blob, 0) != Some(HWPOISON_MAGIC) {
            return Err(Error::Hwpoison("bad magic"));
        }
        // The header's length was checked above.
        let version = le16(blob, 4).unwrap_or(0);
        let flags = le16(blob, 6).unwrap_or(0);
        let nr = le32(blob, 8).unwrap_or(0) as usize;
        let capacity = le32(blob, 12).unwrap_or(0) as usize;
        let seq = le64(blob, 16).unwrap_or(0);
        let [minor, major] = version.to_le_bytes();
        if version == 1 {
            return Err(Error::Hwpoison(
                "version 1 (the RFC series' ABI, never merged) is not read",
            ));
        }
        if major != HWPOISON_MAJOR {
            return Err(Error::Hwpoison("unknown major version"));
        }
        let reserved = flags & !HWPOISON_F_INCOMPLETE;
        if minor == HWPOISON_MINOR && reserved != 0 {
            return Err(Error::Hwpoison("reserved flag bits set in minor 0"));
        }
        if seq % 2 == 1 {
            return Err(Error::Hwpoison("being updated (odd seq)"));
        }
        if capacity
            .checked_mul(8)
            .and_then(|c| c.checked_add(HWPOISON_HEADER_LEN))
            != Some(blob.len())
        {
            return Err(Error::Hwpoison("capacity disagrees with the blob size"));
        }
        if nr > capacity {
            return Err(Error::Hwpoison("more PFNs than capacity"));
        }
        // Valid entries with their index in the blob.
        let mut listed: Vec<(Entry, u32)> = Vec::with_capacity(nr);
        let mut rejected = Vec::new();
        let raws = blob[HWPOISON_HEADER_LEN..HWPOISON_HEADER_LEN + 8 * nr].chunks_exact(8);
        for (i, raw) in (0u32..).zip(raws.filter_map(|e| le64(e, 0))) {
            let pfn = raw & HWPOISON_PFN_MASK;
            let t = u8::try_from(raw >> 56).unwrap_or(u8::MAX);
            let problem = match EntryType::of(t, minor) {
                None => Some(EntryProblem::InvalidType(t)),
                Some(_) if pfn.checked_mul(4096).is_none() => Some(EntryProblem::AddressWraps),
                Some(_) if !is_ram(pfn) => Some(EntryProblem::OutsideRam),
                Some(kind) => {
                    listed.push((Entry { pfn, kind }, i));
                    None
                }
            };
            if let Some(problem) = problem {
                rejected.push(RejectedEntry {
                    index: i,
                    raw,
                    pfn,
                    problem,
                });
            }
        }
        // Duplicates: every later listing of a PFN (the sort is stable, so
        // the first listed is kept).
        listed.sort_by_key(|(e, _)| e.pfn);
        let mut entries: Vec<Entry> = Vec::with_capacity(listed.len());
        let mut duplicates = 0u32;
        for (e, index) in listed {
            if entries.last().is_some_and(|l| l.pfn == e.pfn) {
                duplicates = duplicates.saturating_add(1);
                rejected.push(RejectedEntry {
                    index,
                    raw: e.raw(),
                    pfn: e.pfn,
                    problem: EntryProblem::Duplicate,
                });
            } else {
                entries.push(e);
            }
        }
        rejected.sort_by_key(|r| r.index);
        Ok(HwpoisonList {
            version,
            flags,
            incomplete: flags & HWPOISON_F_INCOMPLETE != 0,
            unknown_flags: if minor == HWPOISON_MINOR { 0 } else { reserved },
            seq,
            entries,
            duplicates,
            rejected,
        })
    }

    /// The valid PFNs, sorted.
    pub fn pfns(&self) -> Vec<u64> {
        self.entries.iter().map(|e| e.pfn).collect()
    }
}
