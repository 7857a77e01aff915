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
//!
//! Also how much of guest RAM is resident, as the kernel's RSS counts it
//! (for the report's memory use): [`rss_within_kib`].

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

/// Most mappings read from /proc/self/smaps: rasvmm has a few dozen.
const MAX_SMAPS_MAPPINGS: usize = 4096;

/// The `Rss:` of the mappings in `smaps` (/proc/PID/smaps text) that lie
/// inside `ranges` (host addresses, start..end; ranges that touch count as
/// one, as the kernel may merge their mappings), KiB: resident memory as
/// VmRSS counts it, so the two can be subtracted. mincore(2) cannot be used
/// for that: it also reports the zero pages KVM maps for reads of
/// untouched guest memory, which VmRSS does not count.
pub fn rss_within_kib(smaps: &str, ranges: &[std::ops::Range<u64>]) -> u64 {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut ranges: Vec<std::ops::Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match ranges.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => ranges.push(r),
        }
    }
    let mut total = 0u64;
    let mut inside = false;
    let mut mappings = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, end)) = first.split_once('-') {
            // A mapping's header: "start-end perms offset dev inode [path]".
            mappings += 1;
            if mappings > MAX_SMAPS_MAPPINGS {
                break;
            }
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            inside = match (hex(start), hex(end)) {
                (Some(s), Some(e)) => ranges.iter().any(|r| r.start <= s && e <= r.end && s < e),
                _ => false,
            };
        } else if inside && first == "Rss:" {
            let kib = words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            total = total.saturating_add(kib);
        }
    }
    total
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

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn guest_rss_counts_only_mappings_inside_guest_ram() {
        use super::rss_within_kib;
        let smaps = "\
    55d0a0000000-55d0a0100000 r-xp 00000000 08:01 123 /usr/bin/rasvmm
    Size:               1024 kB
    Rss:                 700 kB
    7f0000000000-7f0008000000 rw-p 00000000 00:00 0
    Size:             131072 kB
    Rss:               40960 kB
    AnonHugePages:     40960 kB
    7f0008000000-7f0008001000 ---p 00000000 00:00 0
    Rss:                   4 kB
    7f0008001000-7f0010000000 rw-p 00000000 00:00 0
    Rss:                1000 kB
    7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
    Rss:                  40 kB
    ";
        // Guest RAM split into three mappings (an madvise split them), the
        // binary and the stack outside.
        let guest = [0x7f00_0000_0000..0x7f00_1000_0000];
        assert_eq!(rss_within_kib(smaps, &guest), 40960 + 4 + 1000);
        // A mapping that only overlaps a range is not inside it.
        assert_eq!(
            rss_within_kib(smaps, &[0x7f00_0000_0000..0x7f00_0400_0000]),
            0
        );
        assert_eq!(rss_within_kib(smaps, &[]), 0);
        // Two guest regions whose mappings touch (and merged): one range.
        let split = [
            0x7f00_0800_0000..0x7f00_1000_0000,
            0x7f00_0000_0000..0x7f00_0800_0000,
        ];
        assert_eq!(rss_within_kib(smaps, &split), 40960 + 4 + 1000);
        // Garbage counts nothing and does not panic.
        for bad in [
            "",
            "Rss: 5 kB",
            "zz-yy rw-p\nRss: 9 kB",
            "1-0 rw-p\nRss: 9 kB",
            "0-ffffffffffffffffff x\nRss: x kB",
        ] {
            assert_eq!(rss_within_kib(bad, &[0..u64::MAX]), 0, "{bad:?}");
        }
    }
}
