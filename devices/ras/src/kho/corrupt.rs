//! Corrupting a hwpoison blob on purpose: what the `kho-corrupt` step does
//! to the guest's real list, to stand for a broken previous kernel right
//! before a kexec. Pure: edits applied to a copy of the blob; the VMM
//! reads the blob out of guest memory and writes the result back.
//!
//! Unless an edit sets them itself, the header stays consistent: entries
//! are appended only while `nr_entries < capacity`, and `seq` ends even,
//! two past the value read (one whole update, as the kernel makes it).

use serde::{Deserialize, Serialize};

use super::{EntryType, HWPOISON_HEADER_LEN, HWPOISON_PFN_MASK};
use crate::bytes::{le32, le64};

/// Where a moved blob goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Place {
    /// This guest-physical address.
    Gpa(u64),
    /// The last page of guest RAM: the blob runs off its end.
    LastPage,
}

/// One change to the blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Edit {
    /// Append these raw u64 entries.
    Append(Vec<u64>),
    /// Append a hardware entry for a page past the end of guest RAM.
    BeyondRam,
    /// Append a hardware entry whose PFN << 12 wraps (PFN 2^52).
    Wrap,
    /// Append a copy of the first entry.
    Duplicate,
    /// Append an entry of this type byte for the last page of guest RAM.
    BadType(u8),
    /// Set the version field.
    Version(u16),
    /// Set the flags field.
    Flags(u16),
    /// Set nr_entries (nothing checks it against capacity).
    NrEntries(u32),
    /// Set seq (nothing keeps it even).
    Seq(u64),
    /// Copy the blob to `place` and point `preserved-data` there (as much
    /// as fits in guest RAM is copied).
    MoveTo(Place),
}

/// What the edits wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Raw entries appended, in order.
    pub appended: Vec<u64>,
    /// The header as written: version, flags, nr_entries, capacity, seq.
    pub version: u16,
    /// Flags.
    pub flags: u16,
    /// nr_entries.
    pub nr_entries: u32,
    /// capacity.
    pub capacity: u32,
    /// seq.
    pub seq: u64,
    /// Where the blob was moved, if it was.
    pub moved_to: Option<u64>,
}

/// Applies `edits` to `blob` (the whole blob, `blob-size` bytes) of a guest
/// whose RAM ends at `ram_end`; a `MoveTo` is resolved to an address and
/// reported, the caller moves the bytes. Errors are one line.
pub fn apply(blob: &mut [u8], edits: &[Edit], ram_end: u64) -> Result<Applied, String> {
    if blob.len() < HWPOISON_HEADER_LEN {
        return Err(format!(
            "the blob is {} bytes, shorter than its header",
            blob.len()
        ));
    }
    let field32 = |b: &[u8], off| le32(b, off).unwrap_or(0);
    let capacity = field32(blob, 12);
    let seq0 = le64(blob, 16).unwrap_or(0);
    let mut seq = None;
    let mut out = Applied::default();
    let last_pfn = (ram_end >> 12).saturating_sub(1);
    for e in edits {
        let append: Vec<u64> = match e {
            Edit::Append(raw) => raw.clone(),
            Edit::BeyondRam => vec![entry(last_pfn + 0x101, EntryType::Hardware)],
            Edit::Wrap => vec![entry(1 << 52, EntryType::Hardware)],
            Edit::Duplicate => {
                if field32(blob, 8) == 0 {
                    return Err("duplicate: the list is empty".into());
                }
                vec![le64(blob, HWPOISON_HEADER_LEN).unwrap_or(0)]
            }
            Edit::BadType(t) => vec![(u64::from(*t) << 56) | last_pfn],
            Edit::Version(v) => {
                blob[4..6].copy_from_slice(&v.to_le_bytes());
                vec![]
            }
            Edit::Flags(f) => {
                blob[6..8].copy_from_slice(&f.to_le_bytes());
                vec![]
            }
            Edit::NrEntries(n) => {
                blob[8..12].copy_from_slice(&n.to_le_bytes());
                vec![]
            }
            Edit::Seq(s) => {
                seq = Some(*s);
                vec![]
            }
            Edit::MoveTo(p) => {
                out.moved_to = Some(match p {
                    Place::Gpa(a) => *a,
                    Place::LastPage => (ram_end & !0xfff).checked_sub(4096).ok_or("no RAM")?,
                });
                vec![]
            }
        };
        for raw in append {
            let nr = field32(blob, 8);
            if nr >= capacity {
                return Err(format!(
                    "cannot append: the list holds {nr} of {capacity} entries"
                ));
            }
            let off = HWPOISON_HEADER_LEN + 8 * nr as usize;
            let slot = blob
                .get_mut(off..off + 8)
                .ok_or("capacity disagrees with the blob size")?;
            slot.copy_from_slice(&raw.to_le_bytes());
            blob[8..12].copy_from_slice(&(nr + 1).to_le_bytes());
            out.appended.push(raw);
        }
    }
    let seq = seq.unwrap_or((seq0 | 1).wrapping_add(1));
    blob[16..24].copy_from_slice(&seq.to_le_bytes());
    out.version = u16::from_le_bytes([blob[4], blob[5]]);
    out.flags = u16::from_le_bytes([blob[6], blob[7]]);
    out.nr_entries = field32(blob, 8);
    out.capacity = capacity;
    out.seq = seq;
    Ok(out)
}

fn entry(pfn: u64, kind: EntryType) -> u64 {
    (u64::from(kind.byte()) << 56) | (pfn & HWPOISON_PFN_MASK)
}
