//! What a guest of rasvmm's own architecture is by default: the CPU models
//! rasvmm offers, by name (`--cpu`, a scenario's `cpu`), how many vCPUs a
//! guest may have, and its kernel command line.

#[cfg(target_arch = "aarch64")]
pub use crate::aarch64::cpu::{profile, profile_names, CpuProfile, DEFAULT_PROFILE, MAX_VCPUS};
#[cfg(target_arch = "x86_64")]
pub use crate::x86_64::cpuid::{profile, profile_names, CpuProfile, DEFAULT_PROFILE};

/// Most vCPUs a guest may have (bounded by the MP table).
#[cfg(target_arch = "x86_64")]
pub const MAX_VCPUS: u8 = crate::x86_64::mptable::MAX_CPUS;

/// The default guest command line. `reboot=k` resets through the i8042 so a
/// triple fault stays a distinct outcome; `panic=-1` reboots at once after a
/// panic. The guest has ACPI tables (hardware-reduced, with a HEST) but no
/// PCI host bridge, so it is told not to look for one, and the i8042 is only
/// a reset line (the options Firecracker passes too).
#[cfg(target_arch = "x86_64")]
pub const DEFAULT_CMDLINE: &str = X86_64_CMDLINE;

/// The default guest command line: the console on the first PL011,
/// `panic=-1` to end at once after a panic (PSCI SYSTEM_RESET, a reboot
/// outcome). Power-off and reset go through PSCI, which KVM serves.
#[cfg(target_arch = "aarch64")]
pub const DEFAULT_CMDLINE: &str = AARCH64_CMDLINE;

/// An x86_64 rasvmm's [`DEFAULT_CMDLINE`], on every build (for tools that
/// run guests of another architecture than their own, as the lab's benchmarks do).
pub const X86_64_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet pci=off \
     i8042.noaux i8042.nomux i8042.dumbkbd";

/// An aarch64 rasvmm's [`DEFAULT_CMDLINE`], on every build.
pub const AARCH64_CMDLINE: &str = "console=ttyAMA0 panic=-1 quiet";
