//! Emulated devices for rasvmm guests.
//!
//! Devices know nothing about KVM: they see port and MMIO accesses through
//! [`bus::Bus`] and raise interrupts through `vm_superio::Trigger`s the VMM
//! wires to irqfds. `legacy` has the PC devices a firmware-less Linux boot
//! needs; RAS devices follow in `ras`.

pub mod bus;
pub mod legacy;
