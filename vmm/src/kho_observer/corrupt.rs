//! The `kho-corrupt` step's work: rewriting the running kernel's real
//! (pinned) hwpoison blob in guest memory, to stand for a corrupt list
//! left by a broken previous kernel right before a kexec. The edits are
//! the pure [`ras::kho::corrupt`]; this module finds the blob through the
//! pinned root, copies it out, and writes the result back (or to where a
//! `move-to` puts it, repointing `preserved-data` in the root FDT).

use std::collections::BTreeSet;

use ras::kho::corrupt::{self, Applied, Edit};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{scan, KhoTracker, Pin};

/// What a `kho-corrupt` step wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KhoCorrupted {
    /// The pinned root.
    pub root: u64,
    /// Where the blob was.
    pub blob: u64,
    /// Its size (`blob-size`).
    pub size: u64,
    /// The edits applied and the header as written.
    pub applied: Applied,
    /// Bytes written into guest RAM: in place, the span the edits changed;
    /// moved, the blob (less than `size` when it runs off the end of RAM).
    pub written: u64,
}

/// Where guest RAM ends (the end of its highest region).
pub fn ram_end(memory: &GuestMemoryMmap) -> u64 {
    memory
        .iter()
        .map(|r| r.start_addr().0.saturating_add(r.len()))
        .max()
        .unwrap_or(0)
}

/// Bytes of guest RAM contiguous from `gpa`, at most `len`.
fn ram_from(memory: &GuestMemoryMmap, gpa: u64, len: u64) -> u64 {
    memory
        .iter()
        .find(|r| gpa >= r.start_addr().0 && gpa - r.start_addr().0 < r.len())
        .map_or(0, |r| (r.len() - (gpa - r.start_addr().0)).min(len))
}

fn write(memory: &GuestMemoryMmap, gpa: u64, bytes: &[u8]) -> Result<(), String> {
    memory
        .write_slice(bytes, GuestAddress(gpa))
        .map_err(|e| format!("writing {} bytes at {gpa:#x}: {e}", bytes.len()))
}

/// Applies `edits` to the pinned root's hwpoison blob. One-line errors.
pub fn corrupt(
    memory: &GuestMemoryMmap,
    sticky: &BTreeSet<u64>,
    tracker: &KhoTracker,
    edits: &[Edit],
) -> Result<KhoCorrupted, String> {
    let Pin::Pinned { root, .. } = tracker.pin() else {
        return Err(format!(
            "no KHO root is pinned ({})",
            serde_json::to_string(tracker.pin()).unwrap_or_default()
        ));
    };
    let root = *root;
    let mut fdt = scan::read_page(memory, sticky, root)
        .ok_or_else(|| format!("the pinned root at {root:#x} is not readable"))?;
    let r = ras::kho::parse_root(&fdt)
        .map_err(|e| format!("the pinned root at {root:#x} is no KHO root now: {e}"))?;
    let s = r
        .subtree(ras::kho::HWPOISON_NODE)
        .ok_or("the pinned root has no hwpoison subtree")?;
    let (blob_at, size) = (s.blob, s.size);
    let mut blob = scan::read(memory, sticky, blob_at, size, ras::kho::MAX_HWPOISON_BLOB)
        .ok_or_else(|| {
            format!("the hwpoison blob ({size} bytes at {blob_at:#x}) is not readable")
        })?;
    let before = blob.clone();
    let applied = corrupt::apply(&mut blob, edits, ram_end(memory))?;
    let written = match applied.moved_to {
        Some(to) => {
            let end = to.checked_add(size).ok_or("the target address wraps")?;
            if sticky.range(to & !0xfff..end).next().is_some() {
                return Err(format!("{to:#x} lies in a sticky-poisoned page"));
            }
            let n = ram_from(memory, to, size);
            write(
                memory,
                to,
                &blob[..usize::try_from(n).map_err(|_| "too large")?],
            )?;
            n
        }
        None => {
            // Only the bytes the edits changed: the kernel may be updating
            // other entries of its list right now.
            let first = before.iter().zip(&blob).position(|(a, b)| a != b);
            let last = before.iter().zip(&blob).rposition(|(a, b)| a != b);
            match (first, last) {
                (Some(i), Some(j)) => {
                    write(memory, blob_at + i as u64, &blob[i..=j])?;
                    (j + 1 - i) as u64
                }
                _ => 0,
            }
        }
    };
    if let Some(to) = applied.moved_to {
        let off = ras::kho::subtree_prop_offset(&fdt, ras::kho::HWPOISON_NODE, "preserved-data")
            .ok_or("the root has no preserved-data to repoint")?;
        fdt[off..off + 8].copy_from_slice(&to.to_le_bytes());
        write(memory, root + off as u64, &fdt[off..off + 8])?;
    }
    Ok(KhoCorrupted {
        root,
        blob: blob_at,
        size,
        applied,
        written,
    })
}
