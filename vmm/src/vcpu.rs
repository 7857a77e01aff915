//! vCPU threads: run KVM_RUN, dispatch port I/O and MMIO, serve requests
//! that must run on the vCPU's own thread (a machine check, an SEA or an
//! NMI for the RAS controller, a state dump), hand host memory errors to the VM's [`HostMemoryErrors`] handler
//! (the RAS controller, which sits above this module), and report why a
//! vCPU stopped.
//!
//! Lifecycle, as Firecracker's VcpuHandle: every vCPU is created and
//! configured before any thread starts ([`VcpuHandle::spawn`] takes a
//! configured fd); each thread is kept with its `JoinHandle`; at the end of
//! the VM each is asked to finish (a request plus a kick) and joined
//! ([`VcpuHandle`]'s `Drop`). Requests arrive on a channel; the sender kicks
//! the thread with [`kick_signal`], whose handler sets
//! `kvm_run.immediate_exit` so the request is served even if the signal
//! lands just before KVM_RUN. A kick reaches a thread only while it is
//! registered as running (see [`KickTarget`]), so it never hits a thread
//! that has exited. KVM reports a guest access to hwpoisoned host memory as
//! SIGBUS BUS_MCEERR_AR to the vCPU thread, with the host address, before
//! the access executes; the handler records it and the loop has the RAS
//! controller report it, as hardware would.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use crate::event::{EventSender, RasEvent, VcpuStop, VmEvent};
use crate::machine::{self, OnVcpu, VcpuArch};
use devices::bus::{lock, Bus};
use kvm_bindings::{
    kvm_run, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_SIMUL_EX, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

/// Work for a vCPU's own thread.
pub enum VcpuRequest {
    /// Run this on the vCPU's thread, between KVM_RUN calls (how the RAS
    /// controller raises a machine check, an SEA or an NMI: those ioctls
    /// act on the calling thread's vCPU).
    OnThread(OnVcpu),
    /// Describe the vCPU's registers and pending events (for a run that
    /// timed out or failed: where was each vCPU?).
    State {
        /// The description.
        reply: Sender<String>,
    },
    /// Leave the run loop and end the thread (the VM is going away).
    Finish,
}

/// Where a kick goes: the vCPU thread's pthread while it runs its loop,
/// `None` before it starts and once it has left the loop. The thread sets
/// and clears it itself, under the lock a kicker holds while it signals,
/// so a kick never reaches a thread that has exited (nor, since the handle
/// joins only after the thread returns, a pthread_t that was reused).
#[derive(Default)]
pub struct KickTarget(Mutex<Option<usize>>);

impl KickTarget {
    fn kick(&self) {
        let target = lock(&self.0);
        if let Some(thread) = *target {
            // pthread_t is an integer on glibc and a pointer on musl; it is
            // kept as usize so the target is Send on both.
            #[allow(clippy::unnecessary_cast)]
            let thread = thread as libc::pthread_t;
            // SAFETY: `thread` is the pthread_t of a thread that is inside
            // its run loop: it clears the target under this same lock
            // before leaving, and it is joined only after it returns, so
            // the id is live. The kick handler is installed process-wide by
            // `install_signal_handlers` before any vCPU thread starts.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    fn register(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        // A pthread_t is pointer-sized on every Linux target.
        #[allow(clippy::unnecessary_cast, clippy::cast_possible_truncation)]
        let me = me as usize;
        *lock(&self.0) = Some(me);
    }

    fn unregister(&self) {
        *lock(&self.0) = None;
    }
}

/// Sends requests to one vCPU thread (cloneable; held by the RAS
/// controller, the session and peer vCPUs).
#[derive(Clone)]
pub struct VcpuSender {
    /// vCPU index.
    pub index: u8,
    tx: Sender<VcpuRequest>,
    kick: Arc<KickTarget>,
}

impl VcpuSender {
    /// Queues a request and kicks the vCPU out of KVM_RUN to serve it;
    /// false if the thread has ended.
    pub fn send(&self, req: VcpuRequest) -> bool {
        if self.tx.send(req).is_err() {
            return false;
        }
        self.kick.kick();
        true
    }

    /// Asks the vCPU where it is; `None` if it did not answer within `wait`
    /// (its thread is busy outside KVM_RUN, or has ended).
    pub fn state(&self, wait: std::time::Duration) -> Option<String> {
        let (reply, rx) = channel();
        if !self.send(VcpuRequest::State { reply }) {
            return None;
        }
        rx.recv_timeout(wait).ok()
    }
}

/// A vCPU's request channel, made before its thread so that every sender
/// exists before any vCPU runs.
pub struct VcpuChannel {
    sender: VcpuSender,
    requests: Receiver<VcpuRequest>,
}

impl VcpuChannel {
    /// A channel for vCPU `index`.
    pub fn new(index: u8) -> Self {
        let (tx, requests) = channel();
        Self {
            sender: VcpuSender {
                index,
                tx,
                kick: Arc::new(KickTarget::default()),
            },
            requests,
        }
    }

    /// Its sender.
    pub fn sender(&self) -> &VcpuSender {
        &self.sender
    }
}

/// Who decides what the guest is told when a vCPU's access hits hwpoisoned
/// host memory (the RAS controller). Called on the vCPU's own thread with
/// its fd, before the access is retried.
pub trait HostMemoryErrors: Send + Sync {
    /// vCPU `index` got SIGBUS `code` for host address `hva`.
    fn consumed(&self, index: u8, fd: &VcpuFd, code: i32, hva: usize) -> Consumed;
}

/// What a vCPU does after its access hit hwpoisoned host memory.
#[derive(Debug, Default)]
pub struct Consumed {
    /// Events to record.
    pub events: Vec<RasEvent>,
    /// The machine check could not be taken (x86: CR4.MCE clear, or MCIP
    /// set): the CPU shuts down, as hardware does, and this says why.
    pub shutdown: Option<String>,
}

/// What a vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u8,
    /// Port-I/O devices (x86 `in`/`out`).
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where stops and RAS events go.
    pub events: EventSender,
    /// What the thread needs of the architecture.
    pub arch: VcpuArch,
    /// Reports host memory errors.
    pub ras: Arc<dyn HostMemoryErrors>,
}

/// Owns one vCPU thread: finishes and joins it when dropped.
pub struct VcpuHandle {
    sender: VcpuSender,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread for the configured `vcpu`.
    pub fn spawn(vcpu: VcpuFd, channel: VcpuChannel, ctx: VcpuContext) -> std::io::Result<Self> {
        let VcpuChannel { sender, requests } = channel;
        let kick = sender.kick.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", ctx.index))
            .spawn(move || run(vcpu, &requests, &kick, &ctx))?;
        Ok(Self {
            sender,
            thread: Some(thread),
        })
    }

    /// Its sender.
    pub fn sender(&self) -> &VcpuSender {
        &self.sender
    }

    /// Asks the thread to finish (it leaves KVM_RUN at the kick).
    pub fn finish(&self) {
        self.sender.send(VcpuRequest::Finish);
    }

    /// Waits for the thread to end; true if it ended normally (not by a
    /// panic). Call [`VcpuHandle::finish`] first.
    pub fn join(&mut self) -> bool {
        self.thread.take().is_none_or(|t| t.join().is_ok())
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.finish();
        self.join();
    }
}

thread_local! {
    /// This thread's kvm_run, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    /// A host memory error the SIGBUS handler saw on this thread: (si_code, address).
    static HOST_MEMORY_ERROR: Cell<Option<(i32, usize)>> = const { Cell::new(None) };
    /// Whether a SIGBUS on this (non-vCPU) thread is expected.
    static EXPECT_SIGBUS: Cell<bool> = const { Cell::new(false) };
    /// Whether this thread is inside KVM_RUN (a SIGBUS then comes from a
    /// guest access, which KVM has not executed; outside it, from rasvmm's
    /// own code, which would run the access again).
    static IN_KVM_RUN: Cell<bool> = const { Cell::new(false) };
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
    if IN_KVM_RUN.with(Cell::get) || EXPECT_SIGBUS.with(Cell::get) {
        HOST_MEMORY_ERROR.with(|c| c.set(Some((code, addr))));
        return;
    }
    if code == libc::BUS_MCEERR_AO {
        // News, not a fault: nothing is re-run by returning. Early reports
        // go to the early-report thread; one that lands here is dropped
        // with a line rather than taken for a fault.
        write_stderr(&[
            b"rasvmm: early host memory-error report at ",
            &hex(addr),
            b" on a thread that did not ask for it; ignored\n",
        ]);
        return;
    }
    // rasvmm itself, not a guest access through KVM, touched failed memory:
    // returning would run the access again forever, and nothing that
    // allocates can run here, so say what happened and end with the
    // documented status.
    write_stderr(&[
        b"rasvmm: host memory error (SIGBUS code ",
        &hex(usize::try_from(code).unwrap_or(0)),
        b") at host address ",
        &hex(addr),
        b": rasvmm touched failed memory outside a vCPU; no report can be written; exiting with status 4\n",
    ]);
    // SAFETY: _exit(2) is async-signal-safe.
    unsafe { libc::_exit(i32::from(crate::host_errors::EXIT_HOST_MEMORY_ERROR)) };
}

/// `v` in hex with a 0x prefix, for a signal handler (no allocation).
fn hex(v: usize) -> [u8; 18] {
    let mut out = [b'0'; 18];
    out[1] = b'x';
    for (i, b) in out[2..].iter_mut().enumerate() {
        let nibble = (v >> (60 - 4 * i)) & 0xf;
        *b = b"0123456789abcdef"[nibble];
    }
    out
}

/// Writes `parts` to stderr from a signal handler.
fn write_stderr(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: write(2) is async-signal-safe; `p` is a live slice.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
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

/// Runs a vCPU until it stops or is asked to finish; a stop is reported
/// on `ctx.events`.
fn run(mut vcpu: VcpuFd, requests: &Receiver<VcpuRequest>, kick: &KickTarget, ctx: &VcpuContext) {
    let run_ptr: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|p| p.set(run_ptr));
    kick.register();
    let stop = 'run: loop {
        while let Ok(req) = requests.try_recv() {
            if !serve(&vcpu, ctx, req) {
                break 'run None;
            }
        }
        IN_KVM_RUN.with(|c| c.set(true));
        let exit = vcpu.run();
        IN_KVM_RUN.with(|c| c.set(false));
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => ctx.pio.read(u64::from(port), data),
            Ok(VcpuExit::IoOut(port, data)) => ctx.pio.write(u64::from(port), data),
            Ok(VcpuExit::MmioRead(addr, data)) => ctx.mmio.read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => ctx.mmio.write(addr, data),
            Ok(VcpuExit::Shutdown) => break Some(VcpuStop::TripleFault(machine::describe(&vcpu))),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => break Some(VcpuStop::SystemShutdown),
                KVM_SYSTEM_EVENT_RESET => break Some(VcpuStop::SystemReset),
                k => break Some(VcpuStop::Error(format!("unhandled KVM system event {k}"))),
            },
            // Only the reads the machine asked KVM to filter come here.
            Ok(VcpuExit::X86Rdmsr(exit)) => match machine::filtered_rdmsr(&ctx.arch, exit.index) {
                Some(v) => {
                    *exit.data = v;
                    *exit.error = 0;
                }
                None => *exit.error = 1,
            },
            Ok(VcpuExit::Hlt) => {
                break Some(VcpuStop::Error(
                    "vCPU halted outside the in-kernel irqchip".into(),
                ))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break Some(VcpuStop::Error(format!(
                    "KVM entry failure, hardware reason {reason:#x} on CPU {cpu}"
                )))
            }
            Ok(VcpuExit::InternalError) => break Some(VcpuStop::Error(internal_error(&mut vcpu))),
            Ok(other) => break Some(VcpuStop::Error(format!("unhandled vCPU exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if let Some((code, addr)) = take_host_memory_error() {
                    if let Some(stop) = host_memory_error(&vcpu, ctx, code, addr) {
                        break Some(stop);
                    }
                }
            }
            Err(e) if e.errno() == libc::EFAULT => {
                // KVM could not map guest memory. If it was hwpoisoned, the
                // SIGBUS came with it; otherwise this is fatal.
                match take_host_memory_error() {
                    Some((code, addr)) => {
                        if let Some(stop) = host_memory_error(&vcpu, ctx, code, addr) {
                            break Some(stop);
                        }
                    }
                    None => break Some(VcpuStop::Error(format!("KVM_RUN failed: {e}"))),
                }
            }
            Err(e) => break Some(VcpuStop::Error(format!("KVM_RUN failed: {e}"))),
        }
    };
    kick.unregister();
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    if let Some(stop) = stop {
        let _ = ctx.events.send(VmEvent::Stopped {
            vcpu: ctx.index,
            stop,
        });
    }
}

/// Serves one request; false for [`VcpuRequest::Finish`].
fn serve(vcpu: &VcpuFd, ctx: &VcpuContext, req: VcpuRequest) -> bool {
    match req {
        VcpuRequest::OnThread(f) => {
            if let Some(e) = f(vcpu) {
                let _ = ctx.events.send(VmEvent::Ras(e));
            }
        }
        VcpuRequest::State { reply } => {
            let _ = reply.send(machine::describe(vcpu));
        }
        VcpuRequest::Finish => return false,
    }
    true
}

/// A guest access hit hwpoisoned host memory: the RAS controller decides
/// what the guest is told, and this thread performs its own part; the stop,
/// if the vCPU shuts down.
fn host_memory_error(vcpu: &VcpuFd, ctx: &VcpuContext, code: i32, hva: usize) -> Option<VcpuStop> {
    let c = ctx.ras.consumed(ctx.index, vcpu, code, hva);
    for event in c.events {
        let _ = ctx.events.send(VmEvent::Ras(event));
    }
    c.shutdown.map(VcpuStop::MachineCheckShutdown)
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
