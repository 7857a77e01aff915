//! The CPU models rasvmm offers guests of its own architecture, by name
//! (`--cpu`, a scenario's `cpu`), how many vCPUs a guest may have, and how
//! its CPU reports a memory error synchronously.

#[cfg(target_arch = "aarch64")]
pub use crate::aarch64::cpu::{profile, profile_names, CpuProfile, DEFAULT_PROFILE, MAX_VCPUS};
#[cfg(target_arch = "x86_64")]
pub use crate::x86_64::cpuid::{profile, profile_names, CpuProfile, DEFAULT_PROFILE};

/// Most vCPUs a guest may have (bounded by the MP table).
#[cfg(target_arch = "x86_64")]
pub const MAX_VCPUS: u8 = crate::x86_64::mptable::MAX_CPUS;

/// How this architecture reports a memory error synchronously, by the name
/// `--poison-report` takes: a machine check on x86, a synchronous external
/// abort on arm64.
#[cfg(target_arch = "x86_64")]
pub const SYNCHRONOUS_ERROR: &str = "mce";
/// How this architecture reports a memory error synchronously, by the name
/// `--poison-report` takes: a machine check on x86, a synchronous external
/// abort on arm64.
#[cfg(target_arch = "aarch64")]
pub const SYNCHRONOUS_ERROR: &str = "sea";
