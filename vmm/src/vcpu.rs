//! vCPU threads: run KVM_RUN, dispatch port I/O, serve requests that must
//! run on the vCPU's own thread (machine-check injection), turn host memory
//! errors into guest machine checks, and report why a vCPU stopped.
//!
//! Requests arrive on a channel; the sender kicks the thread with
//! [`kick_signal`], whose handler sets `kvm_run.immediate_exit` so the
//! request is served even if the signal lands just before KVM_RUN. KVM
//! reports a guest access to hwpoisoned host memory as SIGBUS BUS_MCEERR_AR
//! to the vCPU thread, with the host address, before the access executes;
//! the handler records it and the loop injects an action-required machine
//! check for the guest page, as hardware would.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use devices::bus::{lock, PioBus};
use kvm_bindings::{
    kvm_run, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_SIMUL_EX, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use ras::ledger::Ledger;
use ras::mce::{self as enc, MceRecord, MemoryError};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::mce;
use crate::vm::VmEvent;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// KVM_EXIT_SHUTDOWN: a triple fault, with the vCPU's state as KVM
    /// left it (for diagnosis).
    TripleFault(String),
    /// KVM_SYSTEM_EVENT_SHUTDOWN (for example PSCI SYSTEM_OFF).
    SystemShutdown,
    /// KVM_SYSTEM_EVENT_RESET.
    SystemReset,
    /// An exit rasvmm does not handle, or a KVM_RUN failure.
    Error(String),
}

/// Work for a vCPU's own thread.
pub enum VcpuRequest {
    /// Check whether `record` can be injected now; inject it unless `check_only`.
    Mce {
        /// The record.
        record: MceRecord,
        /// Only check.
        check_only: bool,
        /// The answer.
        reply: Sender<Result<(), mce::Error>>,
    },
    /// Queue an NMI (a GHES notification).
    Nmi,
    /// Describe the vCPU's registers and pending events (for a run that
    /// timed out: where was each vCPU?).
    State {
        /// The description.
        reply: Sender<String>,
    },
}

/// Sends requests to one vCPU thread.
pub struct VcpuHandle {
    /// vCPU index.
    pub index: u8,
    tx: Sender<VcpuRequest>,
    thread: std::os::unix::thread::RawPthread,
}

impl VcpuHandle {
    /// A handle for the thread `thread` that serves `tx`'s receiver.
    pub fn new(
        index: u8,
        tx: Sender<VcpuRequest>,
        thread: std::os::unix::thread::RawPthread,
    ) -> Self {
        Self { index, tx, thread }
    }

    /// Queues a request and kicks the vCPU out of KVM_RUN to serve it.
    pub fn send(&self, req: VcpuRequest) {
        if self.tx.send(req).is_ok() {
            // `thread` is a live vCPU thread (vCPU threads never exit before
            // the process does); the kick handler is installed by
            // `install_signal_handlers` before any vCPU starts.
            // std keeps pthread_t as an integer; libc's type is an integer
            // on glibc and a pointer on musl.
            #[allow(clippy::unnecessary_cast)]
            let thread = self.thread as libc::pthread_t;
            // SAFETY: as above.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

/// What a vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u8,
    /// Port-I/O devices.
    pub bus: Arc<PioBus>,
    /// Where stops and RAS events go.
    pub events: Sender<VmEvent>,
    /// Requests for this thread.
    pub requests: Receiver<VcpuRequest>,
    /// The vCPU's MCG_CAP.
    pub mcg_cap: u64,
    /// Encoding for the guest's vendor.
    pub vendor: enc::Vendor,
    /// Guest memory, to map host addresses to guest addresses.
    pub memory: GuestMemoryMmap,
    /// The poison ledger.
    pub ledger: Arc<Mutex<Ledger>>,
    /// All vCPUs, for broadcast machine checks (set once all are started).
    pub peers: Arc<OnceLock<Vec<VcpuHandle>>>,
    /// When the VMM started, for event times.
    pub started: std::time::Instant,
    /// How a consumed poisoned page is reported.
    pub poison_report: crate::config::PoisonReport,
    /// The GHES error sources, for [`crate::config::PoisonReport::Ghes`].
    pub ghes: Option<Arc<Mutex<crate::ghes::Ghes>>>,
}

thread_local! {
    /// This thread's kvm_run, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    /// A host memory error the SIGBUS handler saw on this thread: (si_code, address).
    static HOST_MEMORY_ERROR: Cell<Option<(i32, usize)>> = const { Cell::new(None) };
    /// Whether a SIGBUS on this (non-vCPU) thread is expected.
    static EXPECT_SIGBUS: Cell<bool> = const { Cell::new(false) };
}

/// The real-time signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's live kvm_run mapping (set by the
            // vCPU loop before its first KVM_RUN and valid for the thread's
            // life); a volatile byte store is all the handler does.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let expected = KVM_RUN.with(|p| !p.get().is_null()) || EXPECT_SIGBUS.with(Cell::get);
    if !expected {
        // rasvmm itself, not a guest access through KVM, touched a poisoned
        // page: returning would re-run the access forever. A bug, so stop
        // with a message rather than hang.
        const MSG: &[u8] =
            b"rasvmm: internal error: the VMM read poisoned guest memory outside a vCPU; exiting\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is static.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(70);
        }
    }
    HOST_MEMORY_ERROR.with(|c| c.set(Some((code, addr))));
}

/// Runs `f`, which may raise SIGBUS on this thread by design (poisoning a
/// page with MADV_HWPOISON signals the caller).
pub fn expecting_sigbus<T>(f: impl FnOnce() -> T) -> T {
    EXPECT_SIGBUS.with(|c| c.set(true));
    let r = f();
    EXPECT_SIGBUS.with(|c| c.set(false));
    r
}

/// Installs the kick and SIGBUS handlers (once per process).
pub fn install_signal_handlers() -> std::io::Result<()> {
    static DONE: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        for (sig, handler) in [
            (kick_signal(), on_kick as *const () as usize),
            (libc::SIGBUS, on_sigbus as *const () as usize),
        ] {
            // SAFETY: a zeroed sigaction filled with an SA_SIGINFO handler
            // that only touches thread-locals; `sigaction` copies it.
            let r = unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = handler;
                sa.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut())
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

/// Takes the host memory error the SIGBUS handler recorded on this thread.
pub fn take_host_memory_error() -> Option<(i32, usize)> {
    HOST_MEMORY_ERROR.with(|c| c.take())
}

/// Runs vCPU `ctx.index` until it stops; reports the stop on `ctx.events`.
pub fn run(mut vcpu: VcpuFd, ctx: VcpuContext) {
    let run_ptr: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|p| p.set(run_ptr));
    let stop = loop {
        while let Ok(req) = ctx.requests.try_recv() {
            serve(&vcpu, &ctx, req);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => ctx.bus.read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => ctx.bus.write(port, data),
            // No MMIO devices yet: reads float high, writes are dropped.
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Shutdown) => break VcpuStop::TripleFault(shutdown_state(&vcpu)),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => break VcpuStop::SystemShutdown,
                KVM_SYSTEM_EVENT_RESET => break VcpuStop::SystemReset,
                k => break VcpuStop::Error(format!("unhandled KVM system event {k}")),
            },
            // Only MCG_CAP reads are filtered to user space (mce::serve_mcg_cap_reads).
            Ok(VcpuExit::X86Rdmsr(exit)) => {
                if exit.index == crate::mce::MSR_IA32_MCG_CAP {
                    *exit.data = ctx.mcg_cap;
                    *exit.error = 0;
                } else {
                    *exit.error = 1;
                }
            }
            Ok(VcpuExit::Hlt) => {
                break VcpuStop::Error("vCPU halted outside the in-kernel irqchip".into())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break VcpuStop::Error(format!(
                    "KVM entry failure, hardware reason {reason:#x} on CPU {cpu}"
                ))
            }
            Ok(VcpuExit::InternalError) => break VcpuStop::Error(internal_error(&mut vcpu)),
            Ok(other) => break VcpuStop::Error(format!("unhandled vCPU exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if let Some((code, addr)) = take_host_memory_error() {
                    host_memory_error(&vcpu, &ctx, code, addr);
                }
            }
            Err(e) if e.errno() == libc::EFAULT => {
                // KVM could not map guest memory. If it was hwpoisoned, the
                // SIGBUS came with it; otherwise this is fatal.
                match take_host_memory_error() {
                    Some((code, addr)) => host_memory_error(&vcpu, &ctx, code, addr),
                    None => break VcpuStop::Error(format!("KVM_RUN failed: {e}")),
                }
            }
            Err(e) => break VcpuStop::Error(format!("KVM_RUN failed: {e}")),
        }
    };
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    let _ = ctx.events.send(VmEvent::Stopped {
        vcpu: ctx.index,
        stop,
    });
}

fn serve(vcpu: &VcpuFd, ctx: &VcpuContext, req: VcpuRequest) {
    match req {
        VcpuRequest::Mce {
            record,
            check_only,
            reply,
        } => {
            let mut r = mce::check(vcpu, ctx.index, ctx.mcg_cap, &record);
            if r.is_ok() && !check_only {
                r = mce::inject(vcpu, ctx.index, &record);
            }
            let _ = reply.send(r);
        }
        VcpuRequest::State { reply } => {
            let _ = reply.send(shutdown_state(vcpu));
        }
        VcpuRequest::Nmi => {
            if let Err(e) = vcpu.nmi() {
                let _ = ctx.events.send(VmEvent::Ras(RasEvent::NotifyFailed {
                    vcpu: ctx.index,
                    error: e.to_string(),
                }));
            }
        }
    }
}

/// The guest-physical address backed by host address `hva`.
pub fn gpa_of(memory: &GuestMemoryMmap, hva: usize) -> Option<u64> {
    memory.iter().find_map(|r| {
        let start = r.as_ptr() as usize;
        let len = usize::try_from(r.len()).ok()?;
        (hva >= start && hva - start < len).then(|| r.start_addr().0 + (hva - start) as u64)
    })
}

/// A guest access hit hwpoisoned host memory (BUS_MCEERR_AR), or the host
/// found poison early (BUS_MCEERR_AO): tell the guest as hardware would.
fn host_memory_error(vcpu: &VcpuFd, ctx: &VcpuContext, code: i32, hva: usize) {
    let now = u64::try_from(ctx.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let Some(gpa) = gpa_of(&ctx.memory, hva) else {
        let _ = ctx
            .events
            .send(VmEvent::Ras(RasEvent::HostErrorOutsideGuest {
                vcpu: ctx.index,
                code,
                hva: hva as u64,
            }));
        return;
    };
    let page = ras::ledger::page_of(gpa);
    let error = if code == libc::BUS_MCEERR_AR {
        MemoryError::Srar
    } else {
        MemoryError::Srao
    };
    if error == MemoryError::Srar && consumed_via_ghes(vcpu, ctx, page, now) {
        return;
    }
    let consumptions = {
        let mut l = lock(&ctx.ledger);
        if error == MemoryError::Srar {
            l.consume(page, now).unwrap_or(0)
        } else {
            let _ = l.poison(page, ras::ledger::Source::Host, now);
            0
        }
    };
    let lmce = ctx.mcg_cap & enc::MCG_LMCE_P != 0;
    let consumed = |result: Option<String>| {
        let _ = ctx.events.send(VmEvent::Ras(RasEvent::Consumed {
            vcpu: ctx.index,
            gpa: page,
            error,
            consumptions,
            at_ms: now,
            result,
            ghes: None,
        }));
    };
    let record = if enc::recoverable(ctx.vendor, ctx.mcg_cap) {
        enc::encode(error, ctx.vendor, page, lmce)
    } else if error == MemoryError::Srar {
        // What a CPU without SER reports; the guest panics, as it would on
        // such hardware, instead of retrying the access forever.
        enc::encode_unrecoverable(page)
    } else {
        // Action-optional news a non-SER guest cannot take: the page stays
        // poisoned and the next access reports it.
        consumed(Some("not reported: the guest has no SER_P".into()));
        return;
    };
    let mut result = mce::check(vcpu, ctx.index, ctx.mcg_cap, &record)
        .and_then(|()| mce::inject(vcpu, ctx.index, &record));
    if result.is_ok() && enc::is_broadcast(error, ctx.vendor, lmce) {
        result = broadcast_others(ctx);
    }
    consumed(result.err().map(|e| e.to_string()));
}

/// In GHES mode, reports the first access to a poisoned page through the
/// configured error source, and lets the accessing vCPU retry while the
/// guest handles it. Returns false when the access must be reported as a
/// machine check instead (MCE mode, no GHES, or escalation).
fn consumed_via_ghes(vcpu: &VcpuFd, ctx: &VcpuContext, page: u64, now: u64) -> bool {
    use crate::config::PoisonReport;
    use crate::ghes::ConsumptionAction;
    use ras::ghes::{Notification, Submitted};
    let (PoisonReport::Ghes(source), Some(ghes)) = (ctx.poison_report, &ctx.ghes) else {
        return false;
    };
    let mut g = lock(ghes);
    match g.on_consumption(page, std::time::Instant::now()) {
        ConsumptionAction::Escalate => false,
        ConsumptionAction::Wait => {
            drop(g);
            // The access is retried until the guest unmaps the page; do not
            // spin a host CPU on it.
            std::thread::sleep(std::time::Duration::from_millis(1));
            true
        }
        ConsumptionAction::Report => {
            let consumptions = lock(&ctx.ledger).consume(page, now).unwrap_or(0);
            let result = match g.memory_error(source, ras::cper::Severity::Recoverable, page, false)
            {
                Ok(r) => {
                    if r.submitted == Submitted::Written {
                        match source {
                            // This thread is the vCPU: the NMI is taken
                            // before the access is retried.
                            Notification::Nmi => vcpu.nmi().err().map(|e| e.to_string()),
                            Notification::Gsiv => {
                                g.notify_gsiv();
                                None
                            }
                            Notification::Polled => None,
                        }
                    } else {
                        None
                    }
                }
                Err(e) => Some(e.to_string()),
            };
            let _ = ctx.events.send(VmEvent::Ras(RasEvent::Consumed {
                vcpu: ctx.index,
                gpa: page,
                error: MemoryError::Srar,
                consumptions,
                at_ms: now,
                result,
                ghes: Some(source),
            }));
            true
        }
    }
}

/// An Intel machine check without LMCE is a broadcast: Linux's handler
/// waits for every CPU to enter it. Like QEMU, the other vCPUs get a bare uncorrected
/// record in bank 1 that Linux grades as nothing to do.
fn broadcast_others(ctx: &VcpuContext) -> Result<(), mce::Error> {
    let Some(peers) = ctx.peers.get() else {
        return Ok(());
    };
    let record = enc::broadcast_companion();
    for p in peers.iter().filter(|p| p.index != ctx.index) {
        // Not waited for: two vCPUs consuming poison at once must not wait
        // on each other. A refusal shows up in the guest's own log.
        let (tx, _rx) = std::sync::mpsc::channel();
        p.send(VcpuRequest::Mce {
            record,
            check_only: false,
            reply: tx,
        });
    }
    Ok(())
}

/// A RAS event for the report and the event stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum RasEvent {
    /// rasvmm poisoned a page.
    Poisoned {
        /// Guest page.
        gpa: u64,
        /// When.
        at_ms: u64,
    },
    /// rasvmm injected a machine check (or refused to, with the reason).
    Injected {
        /// What.
        error: MemoryError,
        /// Guest address.
        gpa: u64,
        /// Target vCPU.
        vcpu: u8,
        /// Delivered to every vCPU.
        broadcast: bool,
        /// When.
        at_ms: u64,
        /// The refusal or failure, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        refused: Option<String>,
    },
    /// A raw record injected through the control API.
    InjectedRaw {
        /// The record.
        record: MceRecord,
        /// Target vCPU.
        vcpu: u8,
        /// Companions went to the other vCPUs.
        broadcast: bool,
        /// When.
        at_ms: u64,
    },
    /// The guest accessed a poisoned page: a synchronous error was raised.
    Consumed {
        /// vCPU that accessed it.
        vcpu: u8,
        /// Guest page.
        gpa: u64,
        /// What the guest was told.
        error: MemoryError,
        /// Consumptions of this page so far.
        consumptions: u32,
        /// When.
        at_ms: u64,
        /// Why the guest could not be told, if it could not.
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<String>,
        /// The GHES source that reported it instead of a machine check.
        #[serde(skip_serializing_if = "Option::is_none")]
        ghes: Option<ras::ghes::Notification>,
    },
    /// A GHES record was reported (written, or queued behind an
    /// unacknowledged one).
    GhesReported {
        /// The error source.
        source: ras::ghes::Notification,
        /// The record's severity.
        severity: ras::cper::Severity,
        /// The memory section's address, if it has one.
        #[serde(skip_serializing_if = "Option::is_none")]
        gpa: Option<u64>,
        /// Written or queued.
        submitted: ras::ghes::Submitted,
        /// When.
        at_ms: u64,
    },
    /// The guest decoded a CPER memory-error section (its
    /// "[Hardware Error]: physical_address:" line).
    GuestDecoded {
        /// The address the guest printed.
        physical_addr: u64,
        /// Whether rasvmm reported a GHES record with that address.
        matches_report: bool,
    },
    /// A notification could not be delivered.
    NotifyFailed {
        /// The vCPU.
        vcpu: u8,
        /// Why.
        error: String,
    },
    /// The guest loaded a new kernel with kexec and is rebooting into it.
    GuestKexec {
        /// Kexecs so far.
        kexecs: u32,
        /// When.
        at_ms: u64,
    },
    /// The guest's KHO state, read when the kernel after a kexec came up.
    KhoScanned {
        /// Kexecs so far.
        after_kexec: u32,
        /// What rasvmm read.
        view: Box<crate::kho::KhoView>,
    },
    /// The host reported a memory error outside guest memory.
    HostErrorOutsideGuest {
        /// Thread's vCPU.
        vcpu: u8,
        /// si_code.
        code: i32,
        /// Host address.
        hva: u64,
    },
}

/// The vCPU state at a triple fault: where it was, in what mode, and the
/// event KVM was delivering.
fn shutdown_state(vcpu: &VcpuFd) -> String {
    let mut s = String::new();
    if let Ok(r) = vcpu.get_regs() {
        s += &format!("rip {:#x} rsp {:#x} rflags {:#x}", r.rip, r.rsp, r.rflags);
    }
    if let Ok(sr) = vcpu.get_sregs() {
        s += &format!(
            " cs {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            sr.cs.selector, sr.cr0, sr.cr3, sr.cr4, sr.efer
        );
    }
    if let Ok(e) = vcpu.get_vcpu_events() {
        let x = e.exception;
        s += &format!(
            "; exception nr {} injected {} pending {} error {:#x}; interrupt nr {} injected {}; nmi injected {} pending {}",
            x.nr, x.injected, x.pending, x.error_code,
            e.interrupt.nr, e.interrupt.injected, e.nmi.injected, e.nmi.pending
        );
    }
    s
}

/// Describes a KVM_EXIT_INTERNAL_ERROR from kvm_run.internal.
fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: KVM fills the `internal` member of the union for
    // KVM_EXIT_INTERNAL_ERROR, the exit being handled.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let what = match internal.suberror {
        KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        KVM_INTERNAL_ERROR_SIMUL_EX => "exception raised while delivering another",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown suberror",
    };
    let n = usize::try_from(internal.ndata)
        .unwrap_or(0)
        .min(internal.data.len());
    let data: Vec<String> = internal.data[..n]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    format!(
        "KVM internal error {} ({what}) data [{}]",
        internal.suberror,
        data.join(" ")
    )
}
