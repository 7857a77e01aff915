//! x86_64 guests: direct 64-bit Linux boot without firmware.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
