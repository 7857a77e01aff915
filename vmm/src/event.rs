//! The events a running VM produces: what the guest or a vCPU did
//! ([`VmEvent`], for the session), why a vCPU stopped ([`VcpuStop`]) and
//! the RAS events of the report and the event stream ([`RasEvent`]).
//!
//! A leaf: every other module of the VMM may import it; it imports only
//! wire types (the API's request, the KHO view) and the ras crate.

use std::sync::mpsc::{channel, Receiver, SendError, Sender, TryRecvError};
use std::sync::Arc;

use guest_agent::ProtocolError;
use ras::mce::{MceRecord, MemoryError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The sending end of the session's event queue: every producer (vCPU
/// threads, UARTs, the reset and power devices, API connections) sends
/// here. Each send also signals an eventfd, which the session's event loop
/// (rust-vmm's event-manager, the `event_loop` module) waits on.
#[derive(Clone)]
pub struct EventSender {
    tx: Sender<VmEvent>,
    wake: Arc<EventFd>,
}

impl EventSender {
    /// Queues `event` and wakes the session.
    pub fn send(&self, event: VmEvent) -> Result<(), SendError<VmEvent>> {
        self.tx.send(event)?;
        // A full counter (2^64 - 2 wake-ups unread) still wakes epoll.
        let _ = self.wake.write(1);
        Ok(())
    }
}

impl crate::api::Submit for EventSender {
    fn submit(&self, call: crate::api::ApiCall) -> bool {
        self.send(VmEvent::Api(call)).is_ok()
    }
}

/// The receiving end: the session takes events from it, and its event loop
/// waits on [`EventQueue::wake_fd`].
pub struct EventQueue {
    rx: Receiver<VmEvent>,
    wake: Arc<EventFd>,
}

impl EventQueue {
    /// The next queued event, if any.
    pub fn try_recv(&self) -> Result<VmEvent, TryRecvError> {
        self.rx.try_recv()
    }

    /// The events queued now, without waiting.
    pub fn try_iter(&self) -> std::sync::mpsc::TryIter<'_, VmEvent> {
        self.rx.try_iter()
    }

    /// The eventfd every send signals.
    pub fn wake_fd(&self) -> Arc<EventFd> {
        self.wake.clone()
    }
}

/// A new event queue.
pub fn queue() -> std::io::Result<(EventSender, EventQueue)> {
    let (tx, rx) = channel();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    Ok((
        EventSender {
            tx,
            wake: wake.clone(),
        },
        EventQueue { rx, wake },
    ))
}

/// Something the guest or a vCPU did.
#[derive(Debug)]
pub enum VmEvent {
    /// A console line.
    Console(String),
    /// A line from the agent (or why it was rejected).
    Agent(Result<Vec<u8>, ProtocolError>),
    /// The guest pulsed the reset line (i8042 0xfe, or the ACPI reset register).
    Reset,
    /// The guest entered ACPI S5 through the sleep control register.
    PowerOff,
    /// A RAS event a vCPU thread saw (a poisoned page consumed).
    Ras(RasEvent),
    /// The host kernel reported a memory failure early (BUS_MCEERR_AO to
    /// rasvmm's early-report thread): `hva` is the failed page's host
    /// address.
    HostMemoryError {
        /// SIGBUS si_code.
        code: i32,
        /// Host address.
        hva: u64,
    },
    /// The guest asked for an error injection through ACPI EINJ
    /// (EXECUTE_OPERATION); the EINJ device is busy until it is answered.
    Einj(ras::einj::Operation),
    /// A control API request.
    Api(crate::api::ApiCall),
    /// A vCPU stopped running.
    Stopped {
        /// Which.
        vcpu: u8,
        /// Why.
        stop: VcpuStop,
    },
}

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
    /// A machine check the vCPU could not take (CR4.MCE clear, or MCIP
    /// set): hardware shuts the CPU down. Says which access and where.
    MachineCheckShutdown(String),
    /// An exit rasvmm does not handle, or a KVM_RUN failure.
    Error(String),
}

/// A RAS event for the report and the event stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
        /// rasvmm's own share, microseconds: from the request reaching
        /// rasvmm (the API connection read its line, the step began, or,
        /// for a host's early report, rasvmm began forwarding it) to the
        /// last vCPU's injection ioctl returning.
        #[serde(default)]
        vmm_us: u64,
        /// The refusal or failure, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        refused: Option<String>,
        /// The GHES source that carried its CPER record (arm64 reports
        /// every memory error with one); none for an x86 machine check.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ghes: Option<ras::ghes::Notification>,
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
        /// rasvmm's own share, microseconds (as for `injected`).
        #[serde(default)]
        vmm_us: u64,
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
        view: Box<crate::kho_observer::KhoView>,
    },
    /// The guest asked for an error injection through ACPI EINJ, and what
    /// rasvmm answered (docs/einj.md).
    GuestEinj {
        /// The request as the guest wrote it.
        request: ras::einj::Request,
        /// What rasvmm did, if it accepted it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<ras::einj::Kind>,
        /// The page it named (accepted requests).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gpa: Option<u64>,
        /// The command status the guest read.
        status: ras::einj::CommandStatus,
        /// Why it was refused or failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Milliseconds from VMM start.
        at_ms: u64,
    },
    /// A helper outside rasvmm poisoned a host frame under rasvmm (the
    /// `host-poison` step).
    HostPoisoned {
        /// rasvmm's host address of the page.
        hva: u64,
        /// The guest page; none for a page of rasvmm's own.
        #[serde(skip_serializing_if = "Option::is_none")]
        gpa: Option<u64>,
        /// The host frame poisoned.
        host_pfn: u64,
        /// When the helper was done.
        at_ms: u64,
    },
    /// The host kernel reported a memory failure in rasvmm's memory: early
    /// (BUS_MCEERR_AO, to rasvmm's early-report thread), or when a vCPU's
    /// access hit it (BUS_MCEERR_AR; the synchronous error the guest got
    /// follows as a `consumed` event).
    HostMemoryError {
        /// What the host reported.
        code: HostErrorCode,
        /// The host address.
        hva: u64,
        /// The guest page behind it; none outside guest RAM.
        #[serde(skip_serializing_if = "Option::is_none")]
        gpa: Option<u64>,
        /// The vCPU whose access hit it; none for an early report.
        #[serde(skip_serializing_if = "Option::is_none")]
        vcpu: Option<u8>,
        /// When rasvmm got it.
        at_ms: u64,
        /// What the guest was told, for an early report.
        #[serde(skip_serializing_if = "Option::is_none")]
        told: Option<ras::ledger::Told>,
        /// Why the guest could not be told, if it could not.
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<String>,
    },
}

impl RasEvent {
    /// When it happened, milliseconds from VMM start, for the events that
    /// say.
    pub fn at_ms(&self) -> Option<u64> {
        match self {
            RasEvent::Poisoned { at_ms, .. }
            | RasEvent::Injected { at_ms, .. }
            | RasEvent::InjectedRaw { at_ms, .. }
            | RasEvent::Consumed { at_ms, .. }
            | RasEvent::GhesReported { at_ms, .. }
            | RasEvent::GuestKexec { at_ms, .. }
            | RasEvent::GuestEinj { at_ms, .. }
            | RasEvent::HostPoisoned { at_ms, .. }
            | RasEvent::HostMemoryError { at_ms, .. } => Some(*at_ms),
            RasEvent::GuestDecoded { .. }
            | RasEvent::NotifyFailed { .. }
            | RasEvent::KhoScanned { .. } => None,
        }
    }
}

/// The two host memory-error reports (siginfo si_code of SIGBUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HostErrorCode {
    /// BUS_MCEERR_AR: an access hit the failed memory.
    #[serde(rename = "BUS_MCEERR_AR")]
    ActionRequired,
    /// BUS_MCEERR_AO: the host found it before anyone touched it.
    #[serde(rename = "BUS_MCEERR_AO")]
    ActionOptional,
}

impl HostErrorCode {
    /// The report a SIGBUS si_code stands for, if it is one.
    pub fn from_si_code(code: i32) -> Option<Self> {
        match code {
            libc::BUS_MCEERR_AR => Some(HostErrorCode::ActionRequired),
            libc::BUS_MCEERR_AO => Some(HostErrorCode::ActionOptional),
            _ => None,
        }
    }

    /// Its name (`BUS_MCEERR_AR`).
    pub fn as_str(self) -> &'static str {
        match self {
            HostErrorCode::ActionRequired => "BUS_MCEERR_AR",
            HostErrorCode::ActionOptional => "BUS_MCEERR_AO",
        }
    }
}
