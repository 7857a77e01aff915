//! The VM-wide KVM set-up an x86_64 guest needs before its vCPUs exist: the
//! TSS and identity-map pages KVM needs on Intel, the in-kernel irqchip
//! (PIC, IOAPIC, LAPICs) and PIT, and guest RAM around the MMIO hole.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;

use super::layout;

/// Sets up `vm`; the error names the step that failed.
pub fn setup(vm: &VmFd) -> Result<(), (&'static str, kvm_ioctls::Error)> {
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| ("set the identity map address", e))?;
    vm.set_tss_address(usize::try_from(layout::KVM_TSS_ADDRESS).unwrap_or(usize::MAX))
        .map_err(|e| ("set the TSS address", e))?;
    vm.create_irq_chip()
        .map_err(|e| ("create the in-kernel irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| ("create the in-kernel PIT", e))
}

/// Guest RAM regions (start, length) for `mem_size` bytes.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    layout::ram_regions(mem_size)
}
