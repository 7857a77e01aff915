//! Architecture-specific guest set-up for rasvmm.
//!
//! Everything that depends on the guest instruction set lives here, split by
//! target: the boot memory layout and firmware-less boot tables, the CPU model
//! the guest sees, and the initial register state. The pure parts (layouts,
//! table encodings, CPUID filtering) are unit-tested without KVM; the parts
//! that program a vCPU take a `kvm_ioctls::VcpuFd`.

pub mod aarch64;
pub mod cpu;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;
