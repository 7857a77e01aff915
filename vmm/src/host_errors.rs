//! Host memory failures under rasvmm: which of rasvmm's threads the host
//! kernel tells early, and the thread that turns its early reports into
//! events.
//!
//! Linux tells the processes that map a failed page (mm/memory-failure.c,
//! `kill_procs`) either at once, with SIGBUS BUS_MCEERR_AO, or only when one
//! of their threads touches the page, with BUS_MCEERR_AR. The choice is per
//! thread (`prctl(PR_MCE_KILL)`), and an early report goes to the first
//! thread of the process that asked for one (`find_early_kill_thread`).
//!
//! rasvmm asks on one thread whose only job is to receive early reports
//! ([`EarlyReports`]): it blocks SIGBUS and takes each report with
//! sigtimedwait(2), so a report is an ordinary [`VmEvent`], handled by the
//! session like any other, never a signal handler interrupting a vCPU or
//! the session midway. Every other thread is set to late before it exists
//! ([`late_by_default`]), so a host whose `vm.memory_failure_early_kill` is
//! 1 cannot pick one of them instead. (QEMU sets PR_MCE_KILL_EARLY for the
//! whole process and handles SIGBUS on whichever thread it lands.) With
//! `--host-mce-kill late` no thread asks: the host poisons the page quietly
//! and the guest hears of it when a vCPU's access hits it (BUS_MCEERR_AR).
//!
//! An action-required report on a thread that is not in KVM_RUN means
//! rasvmm itself touched failed memory: it cannot go on, and exits with
//! [`EXIT_HOST_MEMORY_ERROR`] (see the vcpu module's SIGBUS handler).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::event::{EventSender, VmEvent};

/// rasvmm's exit status when the host's memory under rasvmm itself failed
/// (outcome `host-memory-error`).
pub const EXIT_HOST_MEMORY_ERROR: u8 = 4;

/// How often the early-report thread looks whether it should finish.
const POLL: Duration = Duration::from_millis(100);

/// Sets the calling thread, and every thread it creates from now on, to
/// late reports (PR_MCE_KILL_LATE). Call before any other thread exists.
pub fn late_by_default() -> io::Result<()> {
    set_mce_kill(libc::PR_MCE_KILL_LATE)
}

fn set_mce_kill(policy: libc::c_int) -> io::Result<()> {
    // SAFETY: prctl(PR_MCE_KILL, PR_MCE_KILL_SET, policy, 0, 0) only sets
    // a flag on the calling thread; it takes no pointers.
    let r = unsafe {
        libc::prctl(
            libc::PR_MCE_KILL,
            libc::PR_MCE_KILL_SET,
            libc::c_ulong::try_from(policy).unwrap_or(0),
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The thread that receives the host kernel's early reports and sends each
/// as [`VmEvent::HostMemoryError`]. Finished and joined when dropped.
pub struct EarlyReports {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EarlyReports {
    /// Starts the thread; returns once it has asked for early reports.
    pub fn start(events: EventSender) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, is_ready) = channel();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("host-mce".into())
            .spawn(move || receive(&events, &s, &ready))?;
        let r = is_ready
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the early-report thread ended")));
        let reports = Self {
            stop,
            thread: Some(thread),
        };
        r.map(|()| reports)
    }
}

impl Drop for EarlyReports {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The early-report thread: blocks SIGBUS, asks for early reports, and
/// forwards each until told to stop.
fn receive(
    events: &EventSender,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<io::Result<()>>,
) {
    // SAFETY: a zeroed sigset_t is filled by sigemptyset/sigaddset, and
    // pthread_sigmask only changes this thread's mask. SIGBUS stays
    // blocked for the thread's life: early reports wait for sigtimedwait.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGBUS);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    if let Err(e) = set_mce_kill(libc::PR_MCE_KILL_EARLY) {
        let _ = ready.send(Err(e));
        return;
    }
    let _ = ready.send(Ok(()));
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::c_long::try_from(POLL.as_nanos()).unwrap_or(100_000_000),
    };
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `set` and `timeout` are valid for the call and `info` is
        // written by the kernel when a signal is taken.
        let (sig, info) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigtimedwait(&set, &mut info, &timeout);
            (sig, info)
        };
        if sig != libc::SIGBUS {
            continue;
        }
        // SAFETY: a SIGBUS siginfo carries the fault address.
        let hva = unsafe { info.si_addr() } as u64;
        if let Some(e) = report(info.si_code, hva) {
            let _ = events.send(e);
        }
    }
}

/// The event for a SIGBUS taken by the early-report thread: only the
/// host's memory-error reports count (a SIGBUS someone sent with kill(2)
/// or tgkill(2) is not one).
fn report(code: i32, hva: u64) -> Option<VmEvent> {
    crate::event::HostErrorCode::from_si_code(code).map(|_| VmEvent::HostMemoryError { code, hva })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_memory_error_reports_become_events() {
        match report(libc::BUS_MCEERR_AO, 0x1234_5000) {
            Some(VmEvent::HostMemoryError { code, hva }) => {
                assert_eq!((code, hva), (libc::BUS_MCEERR_AO, 0x1234_5000));
            }
            other => panic!("{other:?}"),
        }
        assert!(report(libc::BUS_MCEERR_AR, 0x1000).is_some());
        assert!(report(libc::BUS_ADRERR, 0x1000).is_none());
        assert!(report(libc::SI_TKILL, 0).is_none());
    }

    #[test]
    fn the_thread_takes_sigbus_and_finishes_promptly() {
        // A SIGBUS sent to the early-report thread is taken by its
        // sigtimedwait (were it not blocked there, the default action would
        // end this test process) and, not being a memory-error report, is
        // not forwarded.
        let (tx, rx) = crate::event::queue().unwrap();
        let reports = EarlyReports::start(tx).unwrap();
        let mut tid = None;
        for t in std::fs::read_dir("/proc/self/task").unwrap() {
            let t = t.unwrap();
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == "host-mce" {
                tid = t
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<libc::c_long>().ok());
            }
        }
        let tid = tid.unwrap();
        // SAFETY: tgkill to a thread of this process that blocks SIGBUS.
        let r = unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::c_long::from(libc::getpid()),
                tid,
                libc::c_long::from(libc::SIGBUS),
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            rx.try_recv().is_err(),
            "a plain SIGBUS is not a host report"
        );
        let t = std::time::Instant::now();
        drop(reports);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
}
