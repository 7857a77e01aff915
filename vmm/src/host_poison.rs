//! Making host memory under rasvmm fail, from outside rasvmm, for tests:
//! poison that the host kernel finds and reports as it would a real DRAM
//! failure, not rasvmm's own MADV_HWPOISON.
//!
//! A helper process (`rasvmm host-poison --pid <pid> --addr <hva>`, which
//! [`poison_from_outside`] starts) reads the host frame behind each of
//! rasvmm's addresses from /proc/<pid>/pagemap and writes it to the host's
//! /sys/kernel/debug/hwpoison/corrupt-pfn (hwpoison-inject), which runs the
//! host's memory_failure() on it: rasvmm's mapping is torn down and rasvmm
//! is told early (BUS_MCEERR_AO) or, when a vCPU touches the page, late
//! (BUS_MCEERR_AR). Both need root (CAP_SYS_ADMIN) on the host, and a host
//! kernel with CONFIG_MEMORY_FAILURE and CONFIG_HWPOISON_INJECT.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Most pages one helper poisons.
pub const MAX_PAGES: usize = 256;
/// How long the helper may take.
const HELPER_LIMIT: Duration = Duration::from_secs(20);
/// hwpoison-inject's file.
const CORRUPT_PFN: &str = "/sys/kernel/debug/hwpoison/corrupt-pfn";
/// Page size of the host mappings poisoned.
const PAGE: u64 = 4096;
/// The same, as a length.
const PAGE_LEN: usize = 4096;

/// Why host memory could not be made to fail.
#[derive(Debug, Error)]
pub enum Error {
    /// pagemap cannot be read.
    #[error("Cannot read /proc/{0}/pagemap")]
    Pagemap(u32, #[source] std::io::Error),
    /// The page has no frame.
    #[error("Host address {0:#x} has no frame in memory (not resident)")]
    NotResident(u64),
    /// PFNs are hidden from unprivileged readers.
    #[error("/proc/PID/pagemap hides frame numbers without CAP_SYS_ADMIN: run as root")]
    Hidden,
    /// hwpoison-inject is not there.
    #[error("{CORRUPT_PFN} is missing: the host kernel needs CONFIG_MEMORY_FAILURE and CONFIG_HWPOISON_INJECT (modprobe hwpoison_inject), and debugfs")]
    NoInject,
    /// The host refused.
    #[error("The host refused to poison frame {pfn:#x}")]
    Inject {
        /// The frame.
        pfn: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Too many pages at once.
    #[error("At most {MAX_PAGES} pages at a time, got {0}")]
    TooMany(usize),
    /// The helper process failed.
    #[error("Host-poison helper: {0}")]
    Helper(String),
}

/// Poisons the host frames behind `hvas` in process `pid` (the helper's
/// side); returns each frame number.
pub fn poison_frames(pid: u32, hvas: &[u64]) -> Result<Vec<u64>, Error> {
    if hvas.len() > MAX_PAGES {
        return Err(Error::TooMany(hvas.len()));
    }
    let mut pagemap =
        std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|e| Error::Pagemap(pid, e))?;
    let mut pfns = Vec::with_capacity(hvas.len());
    for &hva in hvas {
        let mut entry = [0u8; 8];
        pagemap
            .seek(SeekFrom::Start(hva / PAGE * 8))
            .and_then(|_| pagemap.read_exact(&mut entry))
            .map_err(|e| Error::Pagemap(pid, e))?;
        pfns.push(frame(hva, u64::from_le_bytes(entry))?);
    }
    mount_debugfs();
    if !Path::new(CORRUPT_PFN).exists() {
        return Err(Error::NoInject);
    }
    for &pfn in &pfns {
        let r = std::fs::OpenOptions::new()
            .write(true)
            .open(CORRUPT_PFN)
            .and_then(|mut f| f.write_all(format!("{pfn:#x}\n").as_bytes()));
        r.map_err(|source| Error::Inject { pfn, source })?;
    }
    Ok(pfns)
}

/// The frame a pagemap entry names (bit 63 present, bits 0-54 PFN).
fn frame(hva: u64, entry: u64) -> Result<u64, Error> {
    if entry & (1 << 63) == 0 {
        return Err(Error::NotResident(hva));
    }
    match entry & ((1 << 55) - 1) {
        0 => Err(Error::Hidden),
        pfn => Ok(pfn),
    }
}

/// Mounts debugfs at /sys/kernel/debug if hwpoison-inject's file is not
/// there yet (a bare lab host); a failure shows as [`Error::NoInject`].
fn mount_debugfs() {
    if Path::new(CORRUPT_PFN).exists() {
        return;
    }
    // SAFETY: mount(2) with static NUL-terminated strings and no data.
    unsafe {
        libc::mount(
            c"debugfs".as_ptr(),
            c"/sys/kernel/debug".as_ptr(),
            c"debugfs".as_ptr(),
            0,
            std::ptr::null(),
        );
    }
}

/// Runs the helper process on this process's `hvas` and returns the frames
/// it poisoned. `exe` is the rasvmm binary.
pub fn poison_from_outside(exe: &Path, hvas: &[u64]) -> Result<Vec<u64>, Error> {
    if hvas.len() > MAX_PAGES {
        return Err(Error::TooMany(hvas.len()));
    }
    let mut cmd = Command::new(exe);
    cmd.arg("host-poison")
        .arg("--pid")
        .arg(std::process::id().to_string());
    for hva in hvas {
        cmd.arg("--addr").arg(format!("{hva:#x}"));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Helper(format!("cannot start {}: {e}", exe.display())))?;
    let until = Instant::now() + HELPER_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Helper(format!(
                    "no answer within {} s",
                    HELPER_LIMIT.as_secs()
                )));
            }
            Err(e) => return Err(Error::Helper(e.to_string())),
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.by_ref().take(1 << 16).read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.by_ref().take(1 << 12).read_to_string(&mut err);
    }
    if !status.success() {
        let why = err.lines().next().unwrap_or("failed").trim();
        return Err(Error::Helper(
            why.strip_prefix("error: ").unwrap_or(why).to_string(),
        ));
    }
    let pfns: Vec<u64> = out.lines().filter_map(parse_frame_line).collect();
    if pfns.len() != hvas.len() {
        return Err(Error::Helper(format!(
            "reported {} frames for {} pages",
            pfns.len(),
            hvas.len()
        )));
    }
    Ok(pfns)
}

/// The line the helper prints per page poisoned.
pub fn frame_line(hva: u64, pfn: u64) -> String {
    format!("host address {hva:#x}: frame {pfn:#x} poisoned")
}

fn parse_frame_line(l: &str) -> Option<u64> {
    let hex = l.split_once(": frame 0x")?.1.strip_suffix(" poisoned")?;
    u64::from_str_radix(hex, 16).ok()
}

/// A page of rasvmm's own memory, outside guest RAM, for
/// `host-poison:vmm`: it stands for rasvmm's heap or a device buffer.
/// rasvmm never touches it after writing it once, so the host's report of
/// it is the whole test (unmapped when dropped; a poisoned page may be).
pub struct VmmPage {
    addr: *mut libc::c_void,
}

// SAFETY: the mapping is owned by this value alone and never accessed
// after creation; the pointer is only passed to munmap.
unsafe impl Send for VmmPage {}

impl VmmPage {
    /// Maps and writes one private anonymous page (so it has a frame).
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping of one page, checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `addr` is a fresh writable page of our own.
        unsafe { std::ptr::write_bytes(addr.cast::<u8>(), 0x5a, PAGE_LEN) };
        Ok(Self { addr })
    }

    /// Its host address.
    pub fn hva(&self) -> u64 {
        self.addr as u64
    }
}

impl Drop for VmmPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the page this value mapped; nothing refers to it.
        unsafe { libc::munmap(self.addr, PAGE_LEN) };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn pagemap_entries() {
        assert_eq!(frame(0x1000, (1 << 63) | 0x1234).unwrap(), 0x1234);
        assert!(matches!(
            frame(0x1000, 0x1234),
            Err(Error::NotResident(0x1000))
        ));
        assert!(matches!(frame(0x1000, 1 << 63), Err(Error::Hidden)));
        // Soft-dirty and exclusive bits are not part of the PFN.
        assert_eq!(frame(0, (1 << 63) | (1 << 55) | (1 << 56) | 7).unwrap(), 7);
    }

    #[test]
    fn frame_lines_round_trip() {
        let l = frame_line(0x7f00_1000, 0x1a2b);
        assert_eq!(l, "host address 0x7f001000: frame 0x1a2b poisoned");
        assert_eq!(parse_frame_line(&l), Some(0x1a2b));
        assert_eq!(parse_frame_line("frame 0x12"), None);
        assert_eq!(
            parse_frame_line("host address 0x1: frame 0xzz poisoned"),
            None
        );
    }

    #[test]
    fn this_process_pages_resolve_but_too_many_are_refused() {
        let page = VmmPage::new().unwrap();
        // Root reads its own frame numbers; anyone else is told to be root.
        let mut pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut e = [0u8; 8];
        pagemap
            .seek(SeekFrom::Start(page.hva() / PAGE * 8))
            .unwrap();
        pagemap.read_exact(&mut e).unwrap();
        match frame(page.hva(), u64::from_le_bytes(e)) {
            Ok(pfn) => assert!(pfn > 0),
            Err(Error::Hidden) => {}
            Err(other) => panic!("{other}"),
        }
        let many = vec![page.hva(); MAX_PAGES + 1];
        assert!(matches!(
            poison_frames(std::process::id(), &many),
            Err(Error::TooMany(_))
        ));
    }
}
