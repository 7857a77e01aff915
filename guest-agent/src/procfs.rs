//! What the agent reads from (and writes to) the guest kernel's /proc and
//! /sys: a page's PFN, kernel pages of a kind, a page's flags, the
//! HardwareCorrupted counter, sysctls, online CPUs; and shell commands.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::process::{Command as ProcCommand, Stdio};

use guest_agent::{
    ExecResult, GuestPoisonOp, KernelPageKind, PageInfo, SysctlValue, KPF_HWPOISON,
    MAX_EXEC_OUTPUT, MAX_KERNEL_PAGES,
};

use super::PAGE_SIZE;

/// PFN of `vaddr` in process `pid`, from /proc/<pid>/pagemap (bit 63 present,
/// bits 0-54 PFN; Documentation/admin-guide/mm/pagemap.rst).
pub(crate) fn pfn_of(pid: i32, vaddr: u64) -> Result<u64, String> {
    let mut f = File::open(format!("/proc/{pid}/pagemap")).map_err(|e| format!("pagemap: {e}"))?;
    f.seek(SeekFrom::Start(vaddr / PAGE_SIZE as u64 * 8))
        .map_err(|e| format!("pagemap: {e}"))?;
    let mut b = [0u8; 8];
    f.read_exact(&mut b).map_err(|e| format!("pagemap: {e}"))?;
    let e = u64::from_ne_bytes(b);
    if e >> 63 == 0 {
        return Err(format!("page {vaddr:#x} is not present"));
    }
    Ok(e & ((1 << 55) - 1))
}

pub(crate) fn exec(sh: &str, env: &BTreeMap<String, String>) -> Result<ExecResult, String> {
    let out = ProcCommand::new("/bin/sh")
        .arg("-c")
        .arg(sh)
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("sh: {e}"))?;
    let status = out.status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + out.status.signal().unwrap_or(0)
    });
    let clip = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(MAX_EXEC_OUTPUT)]).into_owned();
    Ok(ExecResult {
        status,
        stdout: clip(&out.stdout),
        stderr: clip(&out.stderr),
    })
}

/// Writes `pfn` to hwpoison-inject's file for `op`; whether the page is
/// now poisoned (`Corrupt`) or not (`Unpoison`), as its KPF_HWPOISON says,
/// with the write's error if it failed.
fn hwpoison_inject(op: GuestPoisonOp, pfn: u64) -> Result<(bool, Option<String>), String> {
    let path = op.debugfs_file();
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{pfn:#x}\n").as_bytes()));
    let err = match written {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{path}: {e} (needs CONFIG_HWPOISON_INJECT and debugfs)"
            ))
        }
        Err(e) => Some(e.to_string()),
        Ok(()) => None,
    };
    Ok((is_hwpoisoned(pfn)? == (op == GuestPoisonOp::Corrupt), err))
}

/// Poisons or unpoisons each page with hwpoison-inject; every page is
/// tried, and the pages that did not end up so are named.
pub(crate) fn guest_poison(op: GuestPoisonOp, pfns: &[u64]) -> Result<(), String> {
    if pfns.is_empty() || pfns.len() > MAX_KERNEL_PAGES as usize {
        return Err(format!("1..={MAX_KERNEL_PAGES} pages at a time"));
    }
    let mut failed = Vec::new();
    for &pfn in pfns {
        match hwpoison_inject(op, pfn)? {
            (true, _) => {}
            (false, e) => failed.push(format!(
                "{pfn:#x}: {}",
                e.unwrap_or_else(|| "written, but the kernel left it as it was".into())
            )),
        }
    }
    match failed.len() {
        0 => Ok(()),
        n => Err(format!(
            "{n} of {} pages are not {} ({}): {}",
            pfns.len(),
            match op {
                GuestPoisonOp::Corrupt => "poisoned",
                GuestPoisonOp::Unpoison => "unpoisoned",
            },
            op.debugfs_file(),
            failed
                .iter()
                .take(4)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

/// Most pages `kernel_pages` may try to poison without success before it
/// gives up.
const MAX_POISON_MISSES: usize = 256;

/// hwpoison-inject's filter, set to "free pages only" while it lives: a
/// page found free may be allocated (to this agent, even) before it is
/// poisoned, and memory failure handling applies the filter under the page
/// lock, so only a page still free is ever poisoned.
struct FreePagesOnly;

const FILTER: &str = "/sys/kernel/debug/hwpoison/corrupt-filter";
/// KPF_BUDDY, as hwpoison-inject's flag filter takes it.
const KPF_BUDDY_MASK: u64 = 1 << 10;

impl FreePagesOnly {
    fn set() -> Result<Self, String> {
        let w = |file: &str, v: u64| {
            std::fs::write(format!("{FILTER}-{file}"), v.to_string())
                .map_err(|e| format!("{FILTER}-{file}: {e}"))
        };
        w("flags-mask", KPF_BUDDY_MASK)?;
        w("flags-value", KPF_BUDDY_MASK)?;
        w("enable", 1)?;
        Ok(FreePagesOnly)
    }
}

impl Drop for FreePagesOnly {
    fn drop(&mut self) {
        for (file, v) in [("enable", 0), ("flags-mask", 0), ("flags-value", 0)] {
            let _ = std::fs::write(format!("{FILTER}-{file}"), v.to_string());
        }
    }
}

pub(crate) fn kernel_pages(
    kind: KernelPageKind,
    count: u32,
    stride: u32,
    poison: bool,
) -> Result<Vec<u64>, String> {
    let mut misses = 0;
    let _filter = if poison {
        Some(FreePagesOnly::set()?)
    } else {
        None
    };
    if count == 0 || count > MAX_KERNEL_PAGES {
        return Err(format!("count must be 1..={MAX_KERNEL_PAGES}"));
    }
    let mut f = File::open("/proc/kpageflags").map_err(|e| format!("kpageflags: {e}"))?;
    let bit = 1u64 << kind.kpf_bit();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8 * 4096];
    let mut pfn = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("kpageflags: {e}"))?;
        if n < 8 {
            break;
        }
        for w in buf[..n - n % 8].chunks_exact(8) {
            let flags = u64::from_ne_bytes(std::array::from_fn(|i| w[i]));
            // Skip pages already poisoned: they are not candidates.
            let spaced = out
                .last()
                .is_none_or(|last: &u64| pfn >= last + u64::from(stride.max(1)));
            if flags & bit != 0 && flags & (1 << KPF_HWPOISON) == 0 && spaced {
                if poison && !hwpoison_inject(GuestPoisonOp::Corrupt, pfn)?.0 {
                    misses += 1;
                    if misses == MAX_POISON_MISSES {
                        return Err(format!(
                            "{MAX_POISON_MISSES} pages found could not be poisoned"
                        ));
                    }
                    pfn += 1;
                    continue;
                }
                out.push(pfn);
                if out.len() == count as usize {
                    return Ok(out);
                }
            }
            pfn += 1;
        }
    }
    Ok(out)
}

fn is_hwpoisoned(pfn: u64) -> Result<bool, String> {
    Ok(kpageflags(pfn)? & (1 << KPF_HWPOISON) != 0)
}

fn kpageflags(pfn: u64) -> Result<u64, String> {
    let mut f = File::open("/proc/kpageflags").map_err(|e| format!("kpageflags: {e}"))?;
    let off = pfn.checked_mul(8).ok_or("pfn out of range")?;
    f.seek(SeekFrom::Start(off))
        .map_err(|e| format!("kpageflags: {e}"))?;
    let mut b = [0u8; 8];
    f.read_exact(&mut b)
        .map_err(|_| format!("pfn {pfn:#x} is beyond the guest's memory map"))?;
    Ok(u64::from_ne_bytes(b))
}

pub(crate) fn page_info(pfn: u64) -> Result<PageInfo, String> {
    let flags = kpageflags(pfn)?;
    Ok(PageInfo {
        pfn,
        kpageflags: flags,
        hwpoison: flags & (1 << KPF_HWPOISON) != 0,
        hardware_corrupted_kb: hardware_corrupted_kb(),
    })
}

fn hardware_corrupted_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("HardwareCorrupted:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn sysctl(name: &str, value: Option<&str>) -> Result<SysctlValue, String> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name.split('.').all(|p| !p.is_empty())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if !valid {
        return Err(format!("invalid sysctl name {name:?}"));
    }
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    if let Some(v) = value {
        std::fs::write(&path, v).map_err(|e| format!("{name}: {e}"))?;
    }
    let value = std::fs::read_to_string(&path)
        .map_err(|e| format!("{name}: {e}"))?
        .trim()
        .to_string();
    Ok(SysctlValue {
        name: name.into(),
        value,
    })
}

pub(crate) fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn online_cpus() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(0)
}
