//! The KHO observer: which pages the guest itself believes are poisoned,
//! read from outside by finding its KHO root FDT in guest RAM.
//!
//! A scan reads the first four bytes of every guest page; a page that starts
//! with the FDT magic is read whole (a KHO root is at most a page) and
//! parsed ([`ras::kho`]). After a kexec guest RAM holds several valid roots
//! (the incoming one stays reserved, stale copies linger), so the current
//! one is the one with the highest `kexec-metadata` kexec count. Its
//! `hwpoison` blob is copied out and parsed; the guest may be updating it,
//! so a copy whose sequence number is odd or changed while copying is
//! re-read, a bounded number of times. Every read is bounded by the sizes in
//! [`ras::kho`]; nothing the guest writes can make rasvmm loop or allocate
//! without bound.

use std::time::Instant;

use ras::kho::{self, HwpoisonList, KhoRoot};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Attempts at a consistent copy of the hwpoison blob.
const TORN_READ_RETRIES: u32 = 5;
/// Most KHO roots considered in one scan.
const MAX_ROOTS: usize = 16;

/// The guest's poison set as its KHO state says, compared with the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KhoView {
    /// Guest-physical address of the current KHO root FDT, if one was found.
    pub root: Option<u64>,
    /// Its kexec count (0 before the first kexec).
    pub kexec_count: Option<u32>,
    /// Valid KHO roots found in guest RAM.
    pub roots_found: u32,
    /// The hwpoison subtree: its PFNs, or why it could not be read.
    pub hwpoison: Hwpoison,
    /// How the guest's set compares with rasvmm's ledger.
    pub comparison: Comparison,
    /// Bytes of guest RAM scanned.
    pub scanned_bytes: u64,
    /// Microseconds the scan took.
    pub scan_us: u64,
}

/// The hwpoison subtree's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Hwpoison {
    /// No KHO root, or a root without a hwpoison subtree (an unpatched guest
    /// kernel, or kho=off).
    Absent,
    /// The list, validated.
    Valid {
        /// Sorted PFNs.
        pfns: Vec<u64>,
        /// Duplicates dropped.
        duplicates: u32,
        /// The blob's update sequence number.
        seq: u64,
    },
    /// The subtree or its blob is malformed (a hostile or broken guest).
    Invalid {
        /// Why.
        reason: String,
    },
}

/// The guest's poison set against the ledger's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "verdict")]
pub enum Comparison {
    /// The same pages.
    Agree,
    /// They differ.
    Differ {
        /// Poisoned in the ledger, not known to the guest.
        guest_missing: Vec<u64>,
        /// Known to the guest, not in the ledger.
        guest_extra: Vec<u64>,
    },
    /// No valid guest list to compare.
    Unknown,
}

/// Compares the guest's PFNs with the ledger's pages (guest-physical
/// addresses).
pub fn compare(guest_pfns: &[u64], ledger: &[u64]) -> Comparison {
    let guest: std::collections::BTreeSet<u64> = guest_pfns
        .iter()
        .filter_map(|p| p.checked_mul(4096))
        .collect();
    let ours: std::collections::BTreeSet<u64> = ledger.iter().copied().collect();
    let guest_missing: Vec<u64> = ours.difference(&guest).copied().collect();
    let guest_extra: Vec<u64> = guest.difference(&ours).copied().collect();
    if guest_missing.is_empty() && guest_extra.is_empty() {
        Comparison::Agree
    } else {
        Comparison::Differ {
            guest_missing,
            guest_extra,
        }
    }
}

fn read(memory: &GuestMemoryMmap, gpa: u64, len: u64, max: u64) -> Option<Vec<u8>> {
    if len > max {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    memory.read_slice(&mut buf, GuestAddress(gpa)).ok()?;
    Some(buf)
}

/// Finds every valid KHO root FDT in guest RAM.
fn find_roots(memory: &GuestMemoryMmap) -> (Vec<(u64, KhoRoot)>, u64) {
    let mut roots = Vec::new();
    let mut scanned = 0u64;
    for region in memory.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        scanned += len;
        let base = region.as_ptr();
        let mut off = 0u64;
        while off + 4 <= len && roots.len() < MAX_ROOTS {
            let gpa = start + off;
            let Ok(o) = usize::try_from(off) else {
                break;
            };
            off += 4096;
            // SAFETY: `base` is the start of this region's live host mapping
            // of `len` bytes, held by `memory` for the whole scan, and
            // `o + 4 <= len`. The guest may be writing the word: a volatile
            // read of plain bytes is fine, and anything it sees is checked.
            let word = unsafe { std::ptr::read_volatile(base.add(o).cast::<[u8; 4]>()) };
            if u32::from_be_bytes(word) != kho::FDT_MAGIC {
                continue;
            }
            let Some(fdt) = read(
                memory,
                gpa,
                kho::MAX_FDT_SIZE as u64,
                kho::MAX_FDT_SIZE as u64,
            ) else {
                continue;
            };
            if let Ok(root) = kho::parse_root(&fdt) {
                roots.push((gpa, root));
            }
        }
    }
    (roots, scanned)
}

fn kexec_count(memory: &GuestMemoryMmap, root: &KhoRoot) -> Option<u32> {
    let s = root.subtree(kho::METADATA_NODE)?;
    let blob = read(memory, s.blob, s.size, 73)?;
    kho::kexec_count(&blob).ok()
}

/// Reads and validates the hwpoison blob, re-reading a torn copy.
fn hwpoison(memory: &GuestMemoryMmap, root: &KhoRoot) -> Hwpoison {
    let Some(s) = root.subtree(kho::HWPOISON_NODE) else {
        return Hwpoison::Absent;
    };
    let mut last = String::new();
    for _ in 0..TORN_READ_RETRIES {
        let Some(blob) = read(memory, s.blob, s.size, kho::MAX_HWPOISON_BLOB) else {
            return Hwpoison::Invalid {
                reason: format!(
                    "blob of {} bytes at {:#x} is not readable guest RAM of at most {} bytes",
                    s.size,
                    s.blob,
                    kho::MAX_HWPOISON_BLOB
                ),
            };
        };
        match HwpoisonList::parse(&blob) {
            Ok(list) => {
                // The sequence number again, after the copy: unchanged means
                // the copy is one consistent state.
                let seq_now = memory.read_obj::<u64>(GuestAddress(s.blob + 16)).ok();
                if seq_now == Some(list.seq) {
                    return Hwpoison::Valid {
                        pfns: list.pfns,
                        duplicates: list.duplicates,
                        seq: list.seq,
                    };
                }
                last = "changed while it was read".into();
            }
            Err(e @ kho::Error::Hwpoison("being updated (odd seq)")) => last = e.to_string(),
            Err(e) => {
                return Hwpoison::Invalid {
                    reason: e.to_string(),
                }
            }
        }
        std::thread::yield_now();
    }
    Hwpoison::Invalid {
        reason: format!("no consistent copy in {TORN_READ_RETRIES} reads: {last}"),
    }
}

/// Scans guest RAM and compares the guest's poison set with `ledger` (the
/// ledger's page addresses).
pub fn observe(memory: &GuestMemoryMmap, ledger: &[u64]) -> KhoView {
    let t = Instant::now();
    let (roots, scanned_bytes) = find_roots(memory);
    let roots_found = u32::try_from(roots.len()).unwrap_or(u32::MAX);
    let current = roots
        .iter()
        .map(|(gpa, r)| (kexec_count(memory, r), *gpa, r))
        .max_by_key(|(count, gpa, _)| (count.unwrap_or(0), *gpa));
    let (root, count, hw) = match current {
        Some((count, gpa, r)) => (Some(gpa), count, hwpoison(memory, r)),
        None => (None, None, Hwpoison::Absent),
    };
    let comparison = match &hw {
        Hwpoison::Valid { pfns, .. } => compare(pfns, ledger),
        _ => Comparison::Unknown,
    };
    KhoView {
        root,
        kexec_count: count,
        roots_found,
        hwpoison: hw,
        comparison,
        scanned_bytes,
        scan_us: u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use ras::kho::build;

    use super::*;

    fn guest() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap, gpa: u64, b: &[u8]) {
        m.write_slice(b, GuestAddress(gpa)).unwrap();
    }

    #[test]
    fn comparison() {
        assert_eq!(compare(&[1, 2], &[0x1000, 0x2000]), Comparison::Agree);
        assert_eq!(
            compare(&[2, 3], &[0x1000, 0x2000]),
            Comparison::Differ {
                guest_missing: vec![0x1000],
                guest_extra: vec![0x3000]
            }
        );
    }

    #[test]
    fn finds_the_newest_root_and_its_list() {
        let m = guest();
        // An older root (kexec count 0) and the current one (count 1).
        put(
            &m,
            0x10_0000,
            &build::kho_root(0, &[("kexec-metadata", 0x20_0000, 73)]),
        );
        put(&m, 0x20_0000, &build::metadata(0));
        let hw = build::hwpoison(2, 16, &[0x345, 0x123]);
        put(
            &m,
            0x40_0000,
            &build::kho_root(
                0,
                &[
                    ("kexec-metadata", 0x30_0000, 73),
                    ("hwpoison", 0x50_0000, hw.len() as u64),
                ],
            ),
        );
        put(&m, 0x30_0000, &build::metadata(1));
        put(&m, 0x50_0000, &hw);
        // Something FDT-like that is not KHO.
        put(
            &m,
            0x60_0000,
            &build::fdt(&[("compatible", b"x\0".to_vec())], &[]),
        );
        let v = observe(&m, &[0x123_000, 0x345_000]);
        assert_eq!(v.root, Some(0x40_0000));
        assert_eq!(v.kexec_count, Some(1));
        assert_eq!(v.roots_found, 2);
        assert_eq!(v.scanned_bytes, 16 << 20);
        assert_eq!(
            v.hwpoison,
            Hwpoison::Valid {
                pfns: vec![0x123, 0x345],
                duplicates: 0,
                seq: 2
            }
        );
        assert_eq!(v.comparison, Comparison::Agree);
        let v = observe(&m, &[0x123_000, 0x999_000]);
        assert_eq!(
            v.comparison,
            Comparison::Differ {
                guest_missing: vec![0x999_000],
                guest_extra: vec![0x345_000]
            }
        );
    }

    #[test]
    fn hostile_subtrees_are_reported_not_trusted() {
        let m = guest();
        // Blob size beyond the limit, blob outside guest RAM, torn list.
        for (addr, size, want) in [
            (0x50_0000u64, kho::MAX_HWPOISON_BLOB + 8, "not readable"),
            (0xffff_0000_0000, 56, "not readable"),
            (0x50_0000, 56, "odd seq"),
        ] {
            put(
                &m,
                0x40_0000,
                &build::kho_root(0, &[("hwpoison", addr, size)]),
            );
            put(&m, 0x50_0000, &build::hwpoison(3, 4, &[1]));
            let v = observe(&m, &[]);
            match v.hwpoison {
                Hwpoison::Invalid { reason } => assert!(reason.contains(want), "{reason}"),
                other => panic!("{other:?}"),
            }
            assert_eq!(v.comparison, Comparison::Unknown);
        }
        // No KHO at all.
        let v = observe(&guest(), &[0x1000]);
        assert_eq!((v.root, v.hwpoison), (None, Hwpoison::Absent));
    }
}
