//! Architecture-specific guest set-up for rasvmm.
//!
//! Everything that depends on the guest instruction set lives here, split by
//! target: the boot memory layout and firmware-less boot tables, the CPU model
//! the guest sees, and the initial register state. The pure parts (layouts,
//! table encodings, CPUID filtering) are unit-tested without KVM; the parts
//! that program a vCPU take a `kvm_ioctls::VcpuFd`.
//!
//! The pure parts of [`aarch64`] (board layout, device tree, EFI and ACPI
//! tables) build on every target, so their tests run on x86_64 CI hosts
//! too; [`acpi`] holds the ACPI helpers both architectures share; [`guest`]
//! and [`ras`] say, for rasvmm's own architecture, which CPU models and command line
//! its guests get and how memory errors reach its guests.

pub mod aarch64;
pub mod acpi;
pub mod guest;
pub mod ras;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;
