//! The KHO observer: which pages the guest itself believes are poisoned,
//! read from outside by finding its KHO root FDT in guest RAM.
//!
//! A scan reads the first four bytes of every guest page; a page that starts
//! with the FDT magic is read whole (a KHO root is at most a page) and
//! parsed ([`ras::kho`]). After a kexec guest RAM holds several roots (the
//! incoming one stays reserved, stale copies linger with pointers into
//! memory that has since been reused, and a hostile guest can forge more),
//! so each candidate is checked whole: its `kexec-metadata` and `hwpoison`
//! blobs must parse. The current root is the consistent candidate with the
//! highest kexec count; the inconsistent ones are reported as rejected. Its
//! `hwpoison` blob is copied out and parsed; the guest may be updating it,
//! so a copy whose sequence number is odd or changed while copying is
//! re-read, a bounded number of times. Every read is bounded by the sizes in
//! [`ras::kho`]; nothing the guest writes can make rasvmm loop or allocate
//! without bound. Sticky-poisoned pages are never read: their backing is
//! hwpoisoned, and any access, rasvmm's included, would fault.

use std::collections::BTreeSet;
use std::time::Instant;

use ras::kho::{self, HwpoisonList, KhoRoot};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Attempts at a consistent copy of the hwpoison blob.
const TORN_READ_RETRIES: u32 = 5;
/// Most KHO roots considered in one scan.
const MAX_ROOTS: usize = 16;

/// The guest's poison set as its KHO state says, compared with the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KhoView {
    /// Guest-physical address of the current KHO root FDT, if one was found.
    pub root: Option<u64>,
    /// Its kexec count (0 before the first kexec).
    pub kexec_count: Option<u32>,
    /// KHO root FDTs found in guest RAM.
    pub roots_found: u32,
    /// Roots not taken because their blobs do not parse (stale or forged).
    pub rejected: Vec<Rejected>,
    /// The hwpoison subtree: its PFNs, or why it could not be read.
    pub hwpoison: Hwpoison,
    /// How the guest's set compares with rasvmm's ledger.
    pub comparison: Comparison,
    /// Bytes of guest RAM scanned.
    pub scanned_bytes: u64,
    /// Microseconds the scan took.
    pub scan_us: u64,
}

/// A KHO root that was not taken, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Its guest-physical address.
    pub root: u64,
    /// Its kexec count, if its metadata parsed.
    pub kexec_count: Option<u32>,
    /// Why not.
    pub reason: String,
}

/// A KHO root found in guest RAM, read whole.
struct Candidate {
    root: u64,
    count: Option<u32>,
    hwpoison: Hwpoison,
    /// Why it is not consistent, if it is not.
    why_not: Option<String>,
}

/// Most rejected roots listed in a view.
const MAX_REJECTED: usize = 16;

/// The hwpoison subtree's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Copies `len` bytes at `gpa`, if that is at most `max`, guest RAM, and
/// touches no sticky-poisoned page.
fn read(
    memory: &GuestMemoryMmap,
    sticky: &BTreeSet<u64>,
    gpa: u64,
    len: u64,
    max: u64,
) -> Option<Vec<u8>> {
    if len > max {
        return None;
    }
    let end = gpa.checked_add(len)?;
    if sticky.range(gpa & !0xfff..end).next().is_some() {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    memory.read_slice(&mut buf, GuestAddress(gpa)).ok()?;
    Some(buf)
}

/// Finds every valid KHO root FDT in guest RAM.
fn find_roots(memory: &GuestMemoryMmap, sticky: &BTreeSet<u64>) -> (Vec<(u64, KhoRoot)>, u64) {
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
            if sticky.contains(&gpa) {
                continue;
            }
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
                sticky,
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

fn kexec_count(memory: &GuestMemoryMmap, sticky: &BTreeSet<u64>, root: &KhoRoot) -> Option<u32> {
    let s = root.subtree(kho::METADATA_NODE)?;
    let blob = read(memory, sticky, s.blob, s.size, 73)?;
    kho::kexec_count(&blob).ok()
}

/// Reads and validates the hwpoison blob, re-reading a torn copy.
fn hwpoison(memory: &GuestMemoryMmap, sticky: &BTreeSet<u64>, root: &KhoRoot) -> Hwpoison {
    let Some(s) = root.subtree(kho::HWPOISON_NODE) else {
        return Hwpoison::Absent;
    };
    let mut last = String::new();
    for _ in 0..TORN_READ_RETRIES {
        let Some(blob) = read(memory, sticky, s.blob, s.size, kho::MAX_HWPOISON_BLOB) else {
            return Hwpoison::Invalid {
                reason: format!(
                    "blob of {} bytes at {:#x} is not readable guest RAM of at most {} bytes \
                     (or lies in a poisoned page)",
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
/// ledger's page addresses), never reading the `sticky` pages.
pub fn observe(memory: &GuestMemoryMmap, ledger: &[u64], sticky: &BTreeSet<u64>) -> KhoView {
    let t = Instant::now();
    let (roots, scanned_bytes) = find_roots(memory, sticky);
    let roots_found = u32::try_from(roots.len()).unwrap_or(u32::MAX);
    let mut candidates: Vec<Candidate> = roots
        .iter()
        .map(|(gpa, r)| {
            let count = kexec_count(memory, sticky, r);
            let hwpoison = hwpoison(memory, sticky, r);
            let why_not = match (&count, &hwpoison) {
                (None, _) => Some("no valid kexec-metadata".to_string()),
                (_, Hwpoison::Invalid { reason }) => Some(reason.clone()),
                _ => None,
            };
            Candidate {
                root: *gpa,
                count,
                hwpoison,
                why_not,
            }
        })
        .collect();
    // Consistent first, then the newest; the address breaks ties.
    candidates.sort_by_key(|c| (c.why_not.is_none(), c.count.unwrap_or(0), c.root));
    let chosen = candidates.pop();
    let rejected = candidates
        .into_iter()
        .rev()
        .filter_map(|c| {
            c.why_not.map(|reason| Rejected {
                root: c.root,
                kexec_count: c.count,
                reason,
            })
        })
        .take(MAX_REJECTED)
        .collect();
    let (root, count, hw) = match chosen {
        Some(c) => (Some(c.root), c.count, c.hwpoison),
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
        rejected,
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

    fn observe_all(m: &GuestMemoryMmap, ledger: &[u64]) -> KhoView {
        observe(m, ledger, &BTreeSet::new())
    }

    #[test]
    fn sticky_pages_are_never_read() {
        let m = guest();
        let hw = build::hwpoison(2, 4, &[0x50]);
        put(
            &m,
            0x40_0000,
            &build::kho_root(0, &[("hwpoison", 0x50_0000, hw.len() as u64)]),
        );
        put(&m, 0x50_0000, &hw);
        // The blob's page is sticky: reported, not read.
        let v = observe(&m, &[0x50_0000], &BTreeSet::from([0x50_0000]));
        assert!(matches!(v.hwpoison, Hwpoison::Invalid { .. }));
        // The root's page is sticky: not found at all.
        let v = observe(&m, &[], &BTreeSet::from([0x40_0000]));
        assert_eq!(v.root, None);
    }

    fn put(m: &GuestMemoryMmap, gpa: u64, b: &[u8]) {
        m.write_slice(b, GuestAddress(gpa)).unwrap();
    }

    /// A KHO root at `root` naming a kexec-metadata blob (count `kexecs`)
    /// at `meta` and the hwpoison blob `hw` at `hw_at`, all three written.
    fn put_kho(m: &GuestMemoryMmap, root: u64, meta: u64, kexecs: u32, hw_at: u64, hw: &[u8]) {
        let subtrees = [
            ("kexec-metadata", meta, 73),
            ("hwpoison", hw_at, hw.len() as u64),
        ];
        put(m, root, &build::kho_root(0, &subtrees));
        put(m, meta, &build::metadata(kexecs));
        put(m, hw_at, hw);
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
        put_kho(&m, 0x40_0000, 0x30_0000, 1, 0x50_0000, &hw);
        // Something FDT-like that is not KHO.
        put(
            &m,
            0x60_0000,
            &build::fdt(&[("compatible", b"x\0".to_vec())], &[]),
        );
        let v = observe_all(&m, &[0x123_000, 0x345_000]);
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
        let v = observe_all(&m, &[0x123_000, 0x999_000]);
        assert_eq!(
            v.comparison,
            Comparison::Differ {
                guest_missing: vec![0x999_000],
                guest_extra: vec![0x345_000]
            }
        );
    }

    #[test]
    fn a_newer_but_broken_root_is_rejected() {
        let m = guest();
        let hw = build::hwpoison(2, 4, &[0x77]);
        put_kho(&m, 0x10_0000, 0x20_0000, 2, 0x30_0000, &hw);
        // Stale or forged: a higher count, a hwpoison blob that is garbage.
        let mut junk = hw.clone();
        junk[0] = 0;
        put_kho(&m, 0x40_0000, 0x50_0000, 0xff_ffff, 0x60_0000, &junk);
        let v = observe_all(&m, &[0x77_000]);
        assert_eq!((v.root, v.kexec_count), (Some(0x10_0000), Some(2)));
        assert_eq!(v.comparison, Comparison::Agree);
        assert_eq!(v.rejected.len(), 1);
        assert_eq!(v.rejected[0].root, 0x40_0000);
        assert!(v.rejected[0].reason.contains("bad magic"));
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
            let v = observe_all(&m, &[]);
            match v.hwpoison {
                Hwpoison::Invalid { reason } => assert!(reason.contains(want), "{reason}"),
                other => panic!("{other:?}"),
            }
            assert_eq!(v.comparison, Comparison::Unknown);
        }
        // No KHO at all.
        let v = observe_all(&guest(), &[0x1000]);
        assert_eq!((v.root, v.hwpoison), (None, Hwpoison::Absent));
    }
}
