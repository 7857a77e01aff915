//! Which pages of rasvmm's own guest mapping the host has poisoned, found
//! without touching them.
//!
//! rasvmm hears of host memory failures through SIGBUS reports
//! (host_errors), but a report can be lost (Linux sends them as a standard
//! signal) or never asked for (`--host-mce-kill late`), and a read of such
//! a page by rasvmm itself (the KHO observer's scan, the loader at a
//! reset) would raise SIGBUS outside any vCPU and end the process. Before
//! rasvmm reads guest RAM it asks the host instead: /proc/self/pagemap
//! shows a page whose entry is not present but a swap-type entry (a
//! hwpoison entry is one), and a one-byte process_vm_readv(2) of such a
//! page fails with EFAULT where a direct read would raise SIGBUS; a page
//! that is merely swapped out is read back in, as a direct read would.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// pagemap: the page is in swap (or another non-present swap-type entry:
/// migration, hwpoison) (Documentation/admin-guide/mm/pagemap.rst).
const PM_SWAP: u64 = 1 << 62;
/// Page size of guest RAM's host mapping.
const PAGE: u64 = 4096;
/// pagemap entries read at once (64 KiB).
const CHUNK: usize = 8192;

/// Guest pages (addresses) whose host memory is poisoned, in address order,
/// at most `max`.
pub fn poisoned(memory: &GuestMemoryMmap, max: usize) -> io::Result<Vec<u64>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut found = Vec::new();
    let mut entries = vec![0u8; CHUNK * 8];
    for region in memory.iter() {
        let base = region.as_ptr() as u64;
        let pages = region.len() / PAGE;
        let mut first = 0u64;
        while first < pages {
            let n = usize::try_from(pages - first).map_or(CHUNK, |n| n.min(CHUNK));
            let buf = &mut entries[..n * 8];
            pagemap.read_exact_at(buf, (base / PAGE + first) * 8)?;
            for (page, e) in (first..).zip(buf.chunks_exact(8)) {
                let entry = u64::from_le_bytes(e.try_into().unwrap_or_default());
                if poisoned_entry(entry, base + page * PAGE) {
                    found.push(region.start_addr().0 + page * PAGE);
                    if found.len() >= max {
                        return Ok(found);
                    }
                }
            }
            first += n as u64;
        }
    }
    Ok(found)
}

/// Whether the host page at `hva` is poisoned (its pagemap entry says
/// swap-type and it cannot be read).
pub fn is_poisoned(hva: u64) -> io::Result<bool> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut e = [0u8; 8];
    pagemap.read_exact_at(&mut e, hva / PAGE * 8)?;
    Ok(poisoned_entry(u64::from_le_bytes(e), hva & !(PAGE - 1)))
}

/// Whether the page at `hva`, whose pagemap entry is `entry`, is poisoned:
/// a swap-type entry (the only kind a hwpoisoned page has) that cannot be
/// read (a page merely swapped out can).
fn poisoned_entry(entry: u64, hva: u64) -> bool {
    entry & PM_SWAP != 0 && !readable(hva)
}

/// Whether one byte at `hva` of rasvmm's own memory can be read: a
/// poisoned page makes process_vm_readv fail rather than raise SIGBUS.
fn readable(hva: u64) -> bool {
    let mut byte = 0u8;
    let local = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: hva as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: `local` points at one writable byte on this stack; the kernel
    // reads `remote` through rasvmm's own page tables, checking the address
    // (an unmapped or poisoned one is an error, not a fault here).
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == 1
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn healthy_memory_has_no_poisoned_pages() {
        let memory =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 4 << 20)]).unwrap();
        // Some pages touched, some not: neither is poisoned.
        vm_memory::Bytes::write_obj(&memory, 7u64, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(poisoned(&memory, 16).unwrap(), Vec::<u64>::new());
        let hva = memory.get_host_address(GuestAddress(0x10_0000)).unwrap() as u64;
        assert!(!is_poisoned(hva).unwrap());
        assert!(readable(hva));
        // An address rasvmm does not map cannot be read, and says so.
        assert!(!readable(8));
    }
}
