//! arm64 guests: direct boot of a Linux Image without firmware, with a
//! device tree or ACPI tables.
//!
//! - [`cpu`]: the CPU models;
//! - [`regs`]: KVM_ARM_VCPU_INIT and the boot register state;
//! - [`gic`]: the in-kernel GICv3;
//! - [`sea`]: synchronous external aborts through KVM_SET_VCPU_EVENTS.

pub mod cpu;
#[cfg(target_arch = "aarch64")]
pub mod gic;
#[cfg(target_arch = "aarch64")]
pub mod regs;
#[cfg(target_arch = "aarch64")]
pub mod sea;
