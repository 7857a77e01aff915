//! Reading guest RAM for the observer: bounded copies that never touch a
//! sticky-poisoned page, the scan for pages that start with the FDT magic,
//! and the reads of one root's blobs.

use std::collections::BTreeSet;
use std::hash::BuildHasher;

use ras::kho::{self, HwpoisonList, KhoRoot};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::Hwpoison;

/// Attempts at a consistent copy of the hwpoison blob.
const TORN_READ_RETRIES: u32 = 5;

/// Copies `len` bytes at `gpa`, if that is at most `max`, guest RAM, and
/// touches no sticky-poisoned page.
pub(super) fn read(
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

/// The page at `gpa` (a root is at most one page).
pub(super) fn read_page(
    memory: &GuestMemoryMmap,
    sticky: &BTreeSet<u64>,
    gpa: u64,
) -> Option<Vec<u8>> {
    let n = kho::MAX_FDT_SIZE as u64;
    read(memory, sticky, gpa, n, n)
}

/// A KHO root's identity for "is this the page that was there before": a
/// keyed hash of its FDT bytes and of its kexec-metadata blob (a new kernel
/// can allocate its root where an old one was, with the same FDT bytes; its
/// metadata, with the next kexec count, differs).
pub(super) fn identity(
    keys: &impl BuildHasher,
    page: &[u8],
    root: &KhoRoot,
    metadata: Option<&[u8]>,
) -> u64 {
    let len = (root.total_size as usize).min(page.len());
    keys.hash_one((&page[..len], metadata))
}

/// Calls `f` with every guest page that starts with the FDT magic, in
/// address order, copied; returns the bytes scanned. Every page is looked
/// at: nothing caps the scan.
pub(super) fn each_fdt_page(
    memory: &GuestMemoryMmap,
    sticky: &BTreeSet<u64>,
    mut f: impl FnMut(u64, &[u8]),
) -> u64 {
    let mut scanned = 0u64;
    for region in memory.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        scanned += len;
        let base = region.as_ptr();
        let mut off = 0u64;
        while off + 4 <= len {
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
            let n = (len - (off - 4096)).min(kho::MAX_FDT_SIZE as u64);
            if let Some(page) = read(memory, sticky, gpa, n, n) {
                f(gpa, &page);
            }
        }
    }
    scanned
}

/// The kexec count a root's `kexec-metadata` blob holds, or why none.
pub(super) fn kexec_count(
    memory: &GuestMemoryMmap,
    sticky: &BTreeSet<u64>,
    root: &KhoRoot,
) -> Result<u32, String> {
    metadata(memory, sticky, root).map(|(count, _)| count)
}

/// A root's `kexec-metadata` blob: its kexec count and its bytes, or why
/// none.
pub(super) fn metadata(
    memory: &GuestMemoryMmap,
    sticky: &BTreeSet<u64>,
    root: &KhoRoot,
) -> Result<(u32, Vec<u8>), String> {
    let Some(s) = root.subtree(kho::METADATA_NODE) else {
        return Err(if root.subtrees.is_empty() {
            "bare root without kexec-metadata".into()
        } else {
            "no kexec-metadata subtree".into()
        });
    };
    if s.blob % 4096 != 0 {
        return Err(format!(
            "kexec-metadata blob at {:#x} is not page-aligned (the kernel allocates whole pages)",
            s.blob
        ));
    }
    let blob = read(memory, sticky, s.blob, s.size, kho::METADATA_LEN).ok_or_else(|| {
        format!(
            "kexec-metadata blob of {} bytes at {:#x} is not readable guest RAM of {} bytes",
            s.size,
            s.blob,
            kho::METADATA_LEN
        )
    })?;
    let count = kho::kexec_count(&blob).map_err(|e| e.to_string())?;
    Ok((count, blob))
}

/// Whether the page of `pfn` is guest RAM.
fn in_ram(memory: &GuestMemoryMmap, pfn: u64) -> bool {
    pfn.checked_mul(4096)
        .is_some_and(|a| memory.address_in_range(GuestAddress(a)))
}

/// Reads and validates a root's hwpoison blob, re-reading a torn copy;
/// entries outside guest RAM are moved to the rejected ones.
pub(super) fn hwpoison(
    memory: &GuestMemoryMmap,
    sticky: &BTreeSet<u64>,
    root: &KhoRoot,
) -> Hwpoison {
    let Some(s) = root.subtree(kho::HWPOISON_NODE) else {
        return Hwpoison::Absent;
    };
    if s.blob % 4096 != 0 {
        return Hwpoison::Invalid {
            reason: format!(
                "blob at {:#x} is not page-aligned (the kernel allocates whole pages)",
                s.blob
            ),
        };
    }
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
        match HwpoisonList::parse_in(&blob, |pfn| in_ram(memory, pfn)) {
            Ok(list) => {
                // The sequence number again, after the copy: unchanged means
                // the copy is one consistent state.
                let seq_now = memory.read_obj::<u64>(GuestAddress(s.blob + 16)).ok();
                if seq_now == Some(list.seq) {
                    return valid(list);
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

/// A parsed list as the view reports it.
fn valid(list: HwpoisonList) -> Hwpoison {
    Hwpoison::Valid {
        entries: list.entries,
        incomplete: list.incomplete,
        version: list.version,
        flags: list.flags,
        duplicates: list.duplicates,
        rejected: list.rejected,
        seq: list.seq,
    }
}
