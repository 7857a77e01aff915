//! rasvmm-agent: the guest side of the rasvmm agent protocol.
//!
//! Started by the guest initramfs's /init. It opens the agent UART
//! (`/dev/ttyS1` on x86_64, `/dev/ttyAMA1` on aarch64, or the path in
//! argv[1]) in raw mode, says hello, then
//! serves requests one at a time while forwarding signals that its page
//! holders receive. Page holders are child processes that each own one user
//! page, so that a SIGBUS from memory-failure handling hits a process other
//! than the agent; a holder recovers by mapping a fresh page over the
//! poisoned one and reports what it got.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use guest_agent::{
    decode, encode, AgentMessage, Command, Hello, LineBuffer, PageRecord, Payload, Reply, Request,
    SignalReport, TouchResult, PROTOCOL_VERSION,
};

/// The agent's UART when /init names none: the second serial port.
#[cfg(not(target_arch = "aarch64"))]
const DEFAULT_UART: &str = "/dev/ttyS1";
/// The agent's UART when /init names none: the second PL011.
#[cfg(target_arch = "aarch64")]
const DEFAULT_UART: &str = "/dev/ttyAMA1";

const PAGE_SIZE: usize = 4096;
/// Page holders one agent keeps at most.
const MAX_HOLDERS: usize = 256;
/// Size of a holder's report record: kind, signo, code, addr_lsb, addr, pfn.
const REPORT_SIZE: usize = 40;
const REPORT_READY: u32 = 1;
const REPORT_TOUCHED: u32 = 2;
const REPORT_SIGNAL: u32 = 3;

mod cpio;
mod features;
mod forge;
mod procfs;
mod rasdaemon_db;

use procfs::{
    exec, guest_poison, kernel_pages, online_cpus, page_info, pfn_of, read_trimmed, sysctl,
};

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_UART.into());
    if let Err(e) = run(&path) {
        eprintln!("rasvmm-agent: {e}");
        std::process::exit(1);
    }
}

struct Holder {
    pid: i32,
    /// Agent -> holder commands ('r' read, 'w' write).
    cmd: File,
    /// Holder -> agent reports.
    report: File,
}

struct Agent {
    port: File,
    holders: BTreeMap<u32, Holder>,
    /// A `kexec-load` loaded the next kernel.
    kexec_loaded: bool,
}

fn run(path: &str) -> std::io::Result<()> {
    let port = OpenOptions::new().read(true).write(true).open(path)?;
    set_raw(port.as_raw_fd())?;
    let mut agent = Agent {
        port,
        holders: BTreeMap::new(),
        kexec_loaded: false,
    };
    let hello = AgentMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        cpus: online_cpus(),
        features: Some(features::detect()),
    });
    agent.send(&hello)?;

    let mut lines = LineBuffer::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = vec![libc::pollfd {
            fd: agent.port.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ids: Vec<u32> = agent.holders.keys().copied().collect();
        for id in &ids {
            fds.push(libc::pollfd {
                fd: agent.holders[id].report.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfds
        // that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (i, id) in ids.iter().enumerate() {
            if fds[i + 1].revents != 0 {
                agent.drain_holder(*id)?;
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let n = agent.port.read(&mut buf)?;
            let mut requests = Vec::new();
            lines.push(&buf[..n], |l| requests.push(l.map(|b| b.to_vec())));
            for line in requests {
                match line.and_then(|l| decode::<Request>(&l)) {
                    Ok(req) => agent.serve(req)?,
                    Err(e) => eprintln!("rasvmm-agent: dropped request: {e}"),
                }
            }
        }
    }
}

impl Agent {
    fn send(&mut self, msg: &AgentMessage) -> std::io::Result<()> {
        self.port.write_all(&encode(msg))?;
        self.port.flush()
    }

    fn serve(&mut self, req: Request) -> std::io::Result<()> {
        let poweroff = req.cmd == Command::Poweroff;
        let kexec = req.cmd.reboots_into_next_kernel();
        let result = self.execute(req.cmd);
        let reply = match result {
            Ok(p) => Reply {
                id: req.id,
                ok: Some(p),
                error: None,
            },
            Err(e) => Reply {
                id: req.id,
                ok: None,
                error: Some(e),
            },
        };
        let loaded = reply.error.is_none();
        self.send(&AgentMessage::Reply(reply))?;
        if poweroff {
            power_off();
        }
        if kexec && loaded {
            reboot_kexec();
        }
        Ok(())
    }

    fn execute(&mut self, cmd: Command) -> Result<Payload, String> {
        match cmd {
            Command::Exec { sh, env } => exec(&sh, &env).map(Payload::Exec),
            Command::AllocPage => self.alloc_page().map(Payload::Page),
            Command::TouchPage { page, write } => self.touch_page(page, write).map(Payload::Touch),
            Command::SpinPage { page } => self.spin_page(page).map(|()| Payload::Done),
            Command::KernelPages {
                kind,
                count,
                stride,
                poison,
            } => kernel_pages(kind, count, stride, poison).map(Payload::KernelPages),
            Command::GuestPoison { op, pfns } => guest_poison(op, &pfns).map(|()| Payload::Done),
            Command::PageInfo { pfn } => page_info(pfn).map(Payload::PageInfo),
            Command::Sysctl { name, value } => sysctl(&name, value.as_deref()).map(Payload::Sysctl),
            Command::Rasdaemon { at_least } => {
                rasdaemon_db::rasdaemon(at_least).map(Payload::Rasdaemon)
            }
            Command::Poweroff => {
                // SAFETY: sync() has no preconditions.
                unsafe { libc::sync() };
                Ok(Payload::Done)
            }
            Command::Kexec { append } => kexec_load(append.as_deref()).map(|()| Payload::Done),
            Command::KexecLoad { append } => {
                kexec_load(append.as_deref())?;
                self.kexec_loaded = true;
                Ok(Payload::Done)
            }
            Command::KexecReboot if self.kexec_loaded => Ok(Payload::Done),
            Command::KexecReboot => Err("kexec-reboot: no kernel loaded (kexec-load first)".into()),
            Command::ForgeKho { defect, count } => {
                forge::forge_kho(defect, count).map(|()| Payload::Done)
            }
        }
    }

    fn alloc_page(&mut self) -> Result<PageRecord, String> {
        if self.holders.len() >= MAX_HOLDERS {
            return Err(format!("at most {MAX_HOLDERS} pages can be held"));
        }
        let id = self.holders.keys().next_back().map_or(0, |k| k + 1);
        let (cmd_r, cmd_w) = pipe()?;
        let (rep_r, rep_w) = pipe()?;
        // SAFETY: the agent is single-threaded, so the child may run any code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: sysconf has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
        let cpu = id % u32::try_from(online).unwrap_or(1);
        if pid == 0 {
            drop(cmd_w);
            drop(rep_r);
            pin_to(cpu);
            holder_main(cmd_r, rep_w);
        }
        drop(cmd_r);
        drop(rep_w);
        let mut report = File::from(rep_r);
        let r = read_report(&mut report).map_err(|e| format!("page holder: {e}"))?;
        if r.kind != REPORT_READY {
            return Err("page holder failed to map its page".into());
        }
        let vaddr = r.addr;
        let pfn = pfn_of(pid, vaddr)?;
        self.holders.insert(
            id,
            Holder {
                pid,
                cmd: File::from(cmd_w),
                report,
            },
        );
        Ok(PageRecord {
            page: id,
            pid,
            vaddr,
            pfn,
            cpu,
        })
    }

    fn spin_page(&mut self, page: u32) -> Result<(), String> {
        let h = self
            .holders
            .get_mut(&page)
            .ok_or_else(|| format!("no such page {page}"))?;
        h.cmd
            .write_all(b"s")
            .map_err(|e| format!("page holder {page} is gone: {e}"))
    }

    fn touch_page(&mut self, page: u32, write: bool) -> Result<TouchResult, String> {
        let h = self
            .holders
            .get_mut(&page)
            .ok_or_else(|| format!("no such page {page}"))?;
        h.cmd
            .write_all(if write { b"w" } else { b"r" })
            .map_err(|e| format!("page holder {page} is gone: {e}"))?;
        let pid = h.pid;
        let mut signal = None;
        // A touch yields its signals (if any) and then one TOUCHED report; a
        // holder that keeps faulting is given up on rather than waited for.
        for _ in 0..8 {
            let r = read_report(&mut h.report).map_err(|e| format!("page holder {page}: {e}"))?;
            match r.kind {
                REPORT_SIGNAL => {
                    let s = r.signal(page, pid);
                    signal = Some(s);
                    self.port
                        .write_all(&encode(&AgentMessage::Signal(s)))
                        .map_err(|e| e.to_string())?;
                }
                REPORT_TOUCHED => {
                    return Ok(TouchResult {
                        page,
                        signal,
                        intact: r.code == 1,
                        pfn: pfn_of(pid, r.addr).ok(),
                    })
                }
                k => return Err(format!("page holder {page} sent report kind {k}")),
            }
        }
        Err(format!("page holder {page} keeps faulting"))
    }

    /// Forwards asynchronous reports (an action-optional SIGBUS) from a holder.
    fn drain_holder(&mut self, id: u32) -> std::io::Result<()> {
        let Some(h) = self.holders.get_mut(&id) else {
            return Ok(());
        };
        match read_report(&mut h.report) {
            Ok(r) if r.kind == REPORT_SIGNAL => {
                let s = r.signal(id, h.pid);
                self.send(&AgentMessage::Signal(s))
            }
            Ok(_) => Ok(()),
            Err(_) => {
                // The holder died; reap it and forget it.
                let pid = h.pid;
                // SAFETY: waitpid on our own child with a valid status pointer.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
                self.holders.remove(&id);
                Ok(())
            }
        }
    }
}

struct Report {
    kind: u32,
    signo: i32,
    code: i32,
    addr_lsb: i32,
    addr: u64,
}

impl Report {
    fn signal(&self, page: u32, pid: i32) -> SignalReport {
        SignalReport {
            page,
            pid,
            signo: self.signo,
            code: self.code,
            addr: self.addr,
            addr_lsb: self.addr_lsb,
        }
    }
}

fn read_report(f: &mut File) -> std::io::Result<Report> {
    let mut b = [0u8; REPORT_SIZE];
    f.read_exact(&mut b)?;
    let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| u64::from_ne_bytes(std::array::from_fn(|i| b[o + i]));
    Ok(Report {
        kind: u32_at(0),
        signo: u32_at(4) as i32,
        code: u32_at(8) as i32,
        addr_lsb: u32_at(12) as i32,
        addr: u64_at(16),
    })
}

/// The holder's report pipe, for the signal handler.
static mut HOLDER_REPORT_FD: RawFd = -1;
/// Set by the holder's SIGBUS handler; ends a spin.
static HOLDER_SIGBUS: AtomicBool = AtomicBool::new(false);

fn write_report_raw(fd: RawFd, kind: u32, signo: i32, code: i32, addr_lsb: i32, addr: u64) {
    let mut b = [0u8; REPORT_SIZE];
    b[0..4].copy_from_slice(&kind.to_ne_bytes());
    b[4..8].copy_from_slice(&signo.to_ne_bytes());
    b[8..12].copy_from_slice(&code.to_ne_bytes());
    b[12..16].copy_from_slice(&addr_lsb.to_ne_bytes());
    b[16..24].copy_from_slice(&addr.to_ne_bytes());
    // SAFETY: writes REPORT_SIZE bytes from a live stack buffer; write(2) is
    // async-signal-safe, and a pipe write of this size is atomic.
    unsafe { libc::write(fd, b.as_ptr().cast(), REPORT_SIZE) };
}

extern "C" fn on_sigbus(signo: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr, lsb) = unsafe {
        let i = &*info;
        let addr = i.si_addr() as u64;
        // si_addr_lsb is the short right after si_addr in the _sigfault union.
        let lsb_ptr = (std::ptr::addr_of!(*i) as *const u8).add(16 + 8) as *const i16;
        (i.si_code, addr, i32::from(*lsb_ptr))
    };
    // SAFETY: reading a plain integer set before the handler was installed.
    let fd = unsafe { HOLDER_REPORT_FD };
    write_report_raw(fd, REPORT_SIGNAL, signo, code, lsb, addr);
    HOLDER_SIGBUS.store(true, Ordering::SeqCst);
    if code == guest_agent::BUS_MCEERR_AR {
        // Recover like a RAS-aware application: replace the poisoned page by
        // a fresh zero page so the faulting access can complete.
        let page = usize::try_from(addr).unwrap_or(0) & !(PAGE_SIZE - 1);
        // SAFETY: maps over our own page; mmap is a raw system call, safe to
        // use in a handler that interrupted an access to that same page.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(135) };
        }
    }
}

/// Pins the calling process to `cpu`; a holder that cannot be pinned runs
/// wherever the scheduler puts it.
fn pin_to(cpu: u32) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays within it
    // for any cpu below CPU_SETSIZE, which sysconf's count is; the call only
    // reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Reads the first byte of `page` without pause until a SIGBUS arrives or
/// the spin limit passes. Sends no report: the signal is the report.
fn spin(page: *const u8) {
    HOLDER_SIGBUS.store(false, Ordering::SeqCst);
    let until =
        std::time::Instant::now() + std::time::Duration::from_secs(guest_agent::SPIN_LIMIT_SECS);
    while !HOLDER_SIGBUS.load(Ordering::Relaxed) {
        for _ in 0..4096 {
            // SAFETY: a volatile read of the first byte of the holder's own
            // live page (after a machine check, the fresh page mapped over it).
            unsafe { std::ptr::read_volatile(page) };
        }
        if std::time::Instant::now() >= until {
            break;
        }
    }
}

/// A page holder: maps one page, touches it, reports its address, then
/// accesses it whenever the agent asks. Never returns.
fn holder_main(cmd: OwnedFd, report: OwnedFd) -> ! {
    let report_fd = report.as_raw_fd();
    // SAFETY: single-threaded child; the handler only reads this after it is set.
    unsafe { HOLDER_REPORT_FD = report_fd };
    // SAFETY: installing an SA_SIGINFO handler with a zeroed, then filled, sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        // Early kill follows vm.memory_failure_early_kill, not a per-process choice.
    }
    // SAFETY: anonymous private mapping of one page; result checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        write_report_raw(report_fd, 0, 0, 0, 0, 0);
        // SAFETY: _exit never returns.
        unsafe { libc::_exit(1) };
    }
    let page = p.cast::<u8>();
    // SAFETY: `page` is a live, writable mapping of PAGE_SIZE bytes.
    unsafe { std::ptr::write_bytes(page, 0x5a, PAGE_SIZE) };
    write_report_raw(report_fd, REPORT_READY, 0, 0, 0, page as u64);
    let mut cmd = File::from(cmd);
    let mut c = [0u8; 1];
    // What the first byte should hold (the rest stays 0x5a).
    let mut first = 0x5au8;
    loop {
        match cmd.read(&mut c) {
            Ok(1) => {}
            // The agent went away.
            _ => {
                // SAFETY: _exit never returns.
                unsafe { libc::_exit(0) }
            }
        }
        if c[0] == b's' {
            spin(page);
            continue;
        }
        let mut intact = true;
        // SAFETY: volatile accesses within our own live page of PAGE_SIZE
        // bytes, so the compiler cannot elide what must reach memory.
        unsafe {
            if c[0] == b'w' {
                std::ptr::write_volatile(page, 0xa5);
                first = 0xa5;
            } else {
                for i in 0..PAGE_SIZE {
                    let want = if i == 0 { first } else { 0x5a };
                    intact &= std::ptr::read_volatile(page.add(i)) == want;
                }
            }
        }
        write_report_raw(
            report_fd,
            REPORT_TOUCHED,
            0,
            i32::from(intact),
            0,
            page as u64,
        );
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The kernel the guest kexecs into, and the initramfs packed for it.
#[cfg(not(target_arch = "aarch64"))]
const KEXEC_KERNEL: &str = "/boot/bzImage";
#[cfg(target_arch = "aarch64")]
const KEXEC_KERNEL: &str = "/boot/Image";
/// kexec_file_load(2)'s number: the libc crate names it for x86_64 but not
/// for aarch64 musl, where it is the generic table's 294
/// (include/uapi/asm-generic/unistd.h).
#[cfg(not(target_arch = "aarch64"))]
const SYS_KEXEC_FILE_LOAD: libc::c_long = libc::SYS_kexec_file_load;
#[cfg(target_arch = "aarch64")]
const SYS_KEXEC_FILE_LOAD: libc::c_long = 294;
const KEXEC_INITRAMFS: &str = "/tmp/kexec-initramfs.cpio";
/// Top-level directories not packed into the kexec initramfs (kernel
/// filesystems, and /tmp where the archive itself is written).
const KEXEC_SKIP: [&str; 4] = ["proc", "sys", "dev", "tmp"];

/// Loads the next kernel: [`KEXEC_KERNEL`], an initramfs packed from this
/// root (so the new kernel has the same agent and the same kernel image to
/// kexec again), and this kernel's command line plus `append`.
fn kexec_load(append: Option<&str>) -> Result<(), String> {
    if append.is_some_and(|a| a.len() > guest_agent::MAX_KEXEC_APPEND || a.contains('\0')) {
        return Err("kexec: bad append".into());
    }
    let mut cmdline = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| format!("/proc/cmdline: {e}"))?
        .trim()
        .to_string();
    if let Some(a) = append {
        cmdline.push(' ');
        cmdline.push_str(a);
    }
    let archive =
        cpio::pack_root(&KEXEC_SKIP).map_err(|e| format!("packing the initramfs: {e}"))?;
    std::fs::write(KEXEC_INITRAMFS, archive).map_err(|e| format!("{KEXEC_INITRAMFS}: {e}"))?;
    let kernel = File::open(KEXEC_KERNEL).map_err(|e| format!("{KEXEC_KERNEL}: {e}"))?;
    let initrd = File::open(KEXEC_INITRAMFS).map_err(|e| format!("{KEXEC_INITRAMFS}: {e}"))?;
    let c = std::ffi::CString::new(cmdline).map_err(|_| "kexec: bad command line")?;
    let len = c.as_bytes_with_nul().len();
    // SAFETY: kexec_file_load(2) with two open descriptors, the length of
    // a NUL-terminated command line including its NUL, and no flags.
    let r = unsafe {
        libc::syscall(
            SYS_KEXEC_FILE_LOAD,
            kernel.as_raw_fd(),
            initrd.as_raw_fd(),
            len,
            c.as_ptr(),
            0usize,
        )
    };
    if r != 0 {
        return Err(format!(
            "kexec_file_load: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn reboot_kexec() -> ! {
    // SAFETY: sync() has no preconditions.
    unsafe { libc::sync() };
    // Let the reply leave the UART before the kernel goes away.
    std::thread::sleep(std::time::Duration::from_millis(50));
    // SAFETY: reboot(2) with a valid command; only returns on failure.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC) };
    eprintln!(
        "rasvmm-agent: kexec failed: {}",
        std::io::Error::last_os_error()
    );
    std::process::exit(1);
}

fn power_off() -> ! {
    // SAFETY: reboot(2) with a valid command; only returns on failure.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    eprintln!(
        "rasvmm-agent: poweroff failed: {}",
        std::io::Error::last_os_error()
    );
    std::process::exit(1);
}

fn set_raw(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open tty and `t` a valid termios.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL;
    // SAFETY: valid fd and termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
