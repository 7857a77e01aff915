//! Test only, a hostile guest: forged KHO roots written into the agent's
//! own locked pages (`forge-kho`), for the VMM's KHO observer to find and
//! refuse. The agent runs as root and learns its pages' PFNs from pagemap;
//! the pages stay mapped for the agent's life.

use guest_agent::{KhoDefect, MAX_FORGED_ROOTS};
use ras::kho::{build, EntryType};

use crate::procfs::pfn_of;
use crate::PAGE_SIZE;

/// `pages` locked, populated anonymous pages.
fn map(pages: usize) -> Result<*mut u8, String> {
    // SAFETY: an anonymous private mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    Ok(p.cast::<u8>())
}

/// Copies `bytes` (at most a page) into page `i` of the mapping at `base`.
///
/// # Safety
/// `base` must be a writable mapping of more than `i` pages.
unsafe fn write_page(base: *mut u8, i: usize, bytes: &[u8]) {
    // SAFETY: the caller's mapping holds page i; the copy stays in it.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            base.add(i * PAGE_SIZE),
            bytes.len().min(PAGE_SIZE),
        );
    }
}

/// Physical address of page `i` of the agent's mapping at `base`.
fn phys(base: *mut u8, i: usize) -> Result<u64, String> {
    let pid = i32::try_from(std::process::id()).map_err(|_| "pid")?;
    Ok(pfn_of(pid, base as u64 + (i * PAGE_SIZE) as u64)? * PAGE_SIZE as u64)
}

/// Writes what `defect` says.
pub(crate) fn forge_kho(defect: KhoDefect, count: Option<u32>) -> Result<(), String> {
    match defect {
        KhoDefect::BareRoots => bare_roots(count.unwrap_or(16)),
        d if count.is_some() => Err(format!("{d:?} takes no count")),
        d => one_root(d),
    }
}

/// A root, its kexec-metadata blob and its hwpoison blob in three pages.
fn one_root(defect: KhoDefect) -> Result<(), String> {
    let base = map(3)?;
    let (meta_at, blob_at) = (phys(base, 1)?, phys(base, 2)?);
    let raw = [build::entry(0x1234, EntryType::Hardware)];
    let mut blob = build::hwpoison_raw(ras::kho::HWPOISON_VERSION, 0, 0, 4, &raw);
    let (mut addr, mut size, mut count) = (blob_at, blob.len() as u64, 1000);
    match defect {
        KhoDefect::BadMagic => blob[0] = b'X',
        KhoDefect::Overfull => blob[8] = 9,
        KhoDefect::HugeBlob => size = 1 << 40,
        KhoDefect::WildPointer => addr = 0xdead_0000_0000,
        KhoDefect::Consistent => count = u32::MAX,
        KhoDefect::BareRoots => return Err("bare roots are written elsewhere".into()),
    }
    let root = build::kho_root(
        0,
        &[("kexec-metadata", meta_at, 73), ("hwpoison", addr, size)],
    );
    for (i, bytes) in [root, build::metadata(count), blob].iter().enumerate() {
        // SAFETY: the mapping has three pages.
        unsafe { write_page(base, i, bytes) };
    }
    Ok(())
}

/// `n` bare roots in the `n` lowest-addressed of a pool of pages; the
/// rest of the pool is given back.
fn bare_roots(n: u32) -> Result<(), String> {
    if n == 0 || n > MAX_FORGED_ROOTS {
        return Err(format!("count is 1 to {MAX_FORGED_ROOTS}"));
    }
    let n = n as usize;
    let pool = (4 * n).max(256);
    let base = map(pool)?;
    let mut pages: Vec<(u64, usize)> = (0..pool)
        .map(|i| phys(base, i).map(|p| (p, i)))
        .collect::<Result<_, _>>()?;
    pages.sort_unstable();
    let root = build::kho_root(0, &[]);
    for (k, (_, i)) in pages.iter().enumerate() {
        if k < n {
            // SAFETY: i < pool, the mapping's page count.
            unsafe { write_page(base, *i, &root) };
        } else {
            // SAFETY: unmaps one page of the agent's own mapping, which
            // nothing else refers to.
            unsafe { libc::munmap(base.add(i * PAGE_SIZE).cast(), PAGE_SIZE) };
        }
    }
    Ok(())
}
