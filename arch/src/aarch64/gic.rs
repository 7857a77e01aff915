//! The in-kernel GICv3 (KVM_DEV_TYPE_ARM_VGIC_V3): created after every vCPU
//! (KVM sizes the redistributors from them), placed where the firmware
//! tables say, and initialised before any vCPU runs or any irqfd fires.

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, VmFd};
use thiserror::Error;

use super::layout;

/// Interrupt lines the distributor implements (SGIs, PPIs and SPIs): a
/// multiple of 32; 128 leaves SPIs 0..95 for devices.
pub const NR_IRQS: u32 = 128;

/// Errors creating the GIC.
#[derive(Debug, Error)]
pub enum Error {
    /// KVM cannot create a GICv3 (the host's GIC has no v3 CPU interface?).
    #[error("KVM cannot create a GICv3")]
    Create(#[source] kvm_ioctls::Error),
    /// An attribute was refused.
    #[error("Cannot set the GICv3's {0}")]
    Attr(&'static str, #[source] kvm_ioctls::Error),
}

fn set(gic: &DeviceFd, what: &'static str, group: u32, attr: u64, addr: u64) -> Result<(), Error> {
    let a = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr,
    };
    gic.set_device_attr(&a).map_err(|e| Error::Attr(what, e))
}

/// Creates and initialises the GICv3 for a VM whose vCPUs all exist.
pub fn create(vm: &VmFd) -> Result<DeviceFd, Error> {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm.create_device(&mut dev).map_err(Error::Create)?;
    let dist: u64 = layout::GIC_DIST_START;
    let redist: u64 = layout::GIC_REDIST_START;
    let nr_irqs: u32 = NR_IRQS;
    // KVM reads each value through the pointer during the ioctl.
    set(
        &gic,
        "distributor address",
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_DIST),
        std::ptr::addr_of!(dist) as u64,
    )?;
    set(
        &gic,
        "redistributor address",
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_REDIST),
        std::ptr::addr_of!(redist) as u64,
    )?;
    set(
        &gic,
        "number of interrupts",
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        std::ptr::addr_of!(nr_irqs) as u64,
    )?;
    set(
        &gic,
        "initialisation",
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
        0,
    )?;
    Ok(gic)
}
