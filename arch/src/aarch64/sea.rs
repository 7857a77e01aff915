//! Synchronous external aborts for arm64 guests: KVM_SET_VCPU_EVENTS with
//! `ext_dabt_pending` (Documentation/virt/kvm/api.rst). KVM takes the
//! pending abort over the PC increment of the exit that preceded it, so the
//! guest's ELR points at the faulting instruction and FAR at the address
//! KVM reported, as an SEA from hardware would. Called on the vCPU's own
//! thread, between KVM_RUN calls.

use kvm_bindings::{kvm_vcpu_events, KVM_CAP_ARM_INJECT_EXT_DABT};
use kvm_ioctls::{Kvm, VcpuFd};
use thiserror::Error;

/// Why an SEA could not be raised.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// KVM cannot inject external data aborts.
    #[error("This KVM cannot inject external data aborts (no KVM_CAP_ARM_INJECT_EXT_DABT)")]
    Unsupported,
    /// KVM refused the event.
    #[error("vCPU {0}: KVM_SET_VCPU_EVENTS (ext_dabt_pending) failed: {1}")]
    Set(u8, String),
}

/// Whether this KVM can inject external data aborts.
pub fn supported(kvm: &Kvm) -> bool {
    kvm.check_extension_raw(u64::from(KVM_CAP_ARM_INJECT_EXT_DABT)) > 0
}

/// Makes vCPU `index` take a synchronous external data abort when it next
/// runs.
pub fn inject(fd: &VcpuFd, index: u8) -> Result<(), Error> {
    let mut events = kvm_vcpu_events::default();
    events.exception.ext_dabt_pending = 1;
    fd.set_vcpu_events(&events)
        .map_err(|e| Error::Set(index, e.to_string()))
}
