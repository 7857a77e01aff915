//! vCPU threads: run KVM_RUN, dispatch port I/O, report why a vCPU stopped.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use devices::bus::PioBus;
use kvm_bindings::{
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::vm::VmEvent;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault,
    /// KVM_SYSTEM_EVENT_SHUTDOWN (for example PSCI SYSTEM_OFF).
    SystemShutdown,
    /// KVM_SYSTEM_EVENT_RESET.
    SystemReset,
    /// An exit rasvmm does not handle, or a KVM_RUN failure.
    Error(String),
}

/// Runs vCPU `index` until it stops; reports the stop on `events`.
pub fn run(index: u8, mut vcpu: VcpuFd, bus: Arc<PioBus>, events: Sender<VmEvent>) {
    let stop = loop {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => bus.write(port, data),
            // No MMIO devices yet: reads float high, writes are dropped.
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Shutdown) => break VcpuStop::TripleFault,
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => break VcpuStop::SystemShutdown,
                KVM_SYSTEM_EVENT_RESET => break VcpuStop::SystemReset,
                k => break VcpuStop::Error(format!("unhandled KVM system event {k}")),
            },
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
            }
            Err(e) => break VcpuStop::Error(format!("KVM_RUN failed: {e}")),
        }
    };
    let _ = events.send(VmEvent::Stopped { vcpu: index, stop });
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
