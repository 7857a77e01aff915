//! x86_64 guests: direct 64-bit Linux boot without firmware.
//!
//! - [`board`]: which devices sit at which port and IRQ;
//! - [`loader`]: kernel, initramfs, command line, zero page, e820, ACPI and
//!   MP tables written into guest memory;
//! - [`vm`]: the VM-wide KVM set-up (irqchip, PIT, TSS);
//! - [`regs`], [`cpuid`]: a vCPU's initial state and CPU model;
//! - [`mce`]: KVM's machine-check plumbing (banks, injection, MCG_CAP reads).

pub mod acpi;
pub mod board;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod mce;
pub mod mptable;
pub mod regs;
pub mod vm;
