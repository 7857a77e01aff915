//! An arm64 vCPU's KVM set-up: KVM_ARM_VCPU_INIT with PSCI 0.2 (secondary
//! vCPUs start powered off and are brought up by the guest's PSCI CPU_ON,
//! which KVM serves), the boot register state the arm64 Linux boot protocol
//! asks for (Documentation/arch/arm64/booting.rst: x0 = the device tree's
//! address, x1-x3 = 0, EL1h with DAIF masked, PC at the Image), and a
//! one-line description of where a vCPU is, for diagnostics.

use kvm_bindings::{
    kvm_vcpu_init, user_pt_regs, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_REG_ARM64,
    KVM_REG_ARM64_SYSREG, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64,
};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;

/// PSTATE at entry: EL1 with SP_EL1 (EL1h), and D, A, I, F masked.
pub const PSTATE_BOOT: u64 = 0x3c5;

/// Errors setting up a vCPU.
#[derive(Debug, Error)]
pub enum Error {
    /// KVM has no preferred CPU target for this host.
    #[error("KVM has no preferred vCPU target")]
    PreferredTarget(#[source] kvm_ioctls::Error),
    /// KVM_ARM_VCPU_INIT failed.
    #[error("KVM_ARM_VCPU_INIT failed")]
    Init(#[source] kvm_ioctls::Error),
    /// A register cannot be set.
    #[error("Cannot set register {0}")]
    SetReg(&'static str, #[source] kvm_ioctls::Error),
    /// KVM gave the vCPU another MPIDR than the firmware tables name it by.
    #[error("MPIDR_EL1 affinity is {0:#x}; the firmware tables say {1:#x}")]
    Mpidr(u64, u64),
    /// A register cannot be read.
    #[error("Cannot read register {0}")]
    GetReg(&'static str, #[source] kvm_ioctls::Error),
}

/// The KVM register id of a 64-bit field of `struct kvm_regs` at byte
/// `offset` (KVM counts core registers in 32-bit words).
const fn core_reg(offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (offset / 4) as u64
}

/// `struct user_pt_regs` is the first member of `struct kvm_regs`.
const fn x(n: usize) -> u64 {
    core_reg(std::mem::offset_of!(user_pt_regs, regs) + 8 * n)
}
const PC: u64 = core_reg(std::mem::offset_of!(user_pt_regs, pc));
const SP: u64 = core_reg(std::mem::offset_of!(user_pt_regs, sp));
const PSTATE: u64 = core_reg(std::mem::offset_of!(user_pt_regs, pstate));
/// kvm_regs.sp_el1 and elr_el1 follow user_pt_regs.
const SP_EL1: u64 = core_reg(std::mem::size_of::<user_pt_regs>());
const ELR_EL1: u64 = core_reg(std::mem::size_of::<user_pt_regs>() + 8);

/// A system register's KVM id (op0, op1, CRn, CRm, op2).
const fn sysreg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG as u64
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
}
/// MPIDR_EL1.
pub const MPIDR_EL1: u64 = sysreg(3, 0, 0, 0, 5);
const ESR_EL1: u64 = sysreg(3, 0, 5, 2, 0);
const FAR_EL1: u64 = sysreg(3, 0, 6, 0, 0);

/// Initialises vCPU `index`: PSCI 0.2, and powered off unless it is the
/// boot vCPU (the guest starts the others with PSCI CPU_ON).
pub fn init_vcpu(vm: &VmFd, fd: &VcpuFd, index: u8) -> Result<(), Error> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(Error::PreferredTarget)?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    if index > 0 {
        kvi.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    fd.vcpu_init(&kvi).map_err(Error::Init)
}

fn set(fd: &VcpuFd, id: u64, name: &'static str, value: u64) -> Result<(), Error> {
    fd.set_one_reg(id, &value.to_le_bytes())
        .map(|_| ())
        .map_err(|e| Error::SetReg(name, e))
}

fn get(fd: &VcpuFd, id: u64, name: &'static str) -> Result<u64, Error> {
    let mut b = [0u8; 8];
    fd.get_one_reg(id, &mut b)
        .map_err(|e| Error::GetReg(name, e))?;
    Ok(u64::from_le_bytes(b))
}

/// The boot vCPU's entry state: PC at `entry`, x0 = `fdt`, EL1h, DAIF masked.
/// Secondary vCPUs get theirs from the guest's PSCI CPU_ON.
pub fn setup_boot_vcpu(fd: &VcpuFd, entry: u64, fdt: u64) -> Result<(), Error> {
    set(fd, PSTATE, "PSTATE", PSTATE_BOOT)?;
    set(fd, PC, "PC", entry)?;
    set(fd, x(0), "X0", fdt)?;
    for n in 1..4 {
        set(fd, x(n), "X1-X3", 0)?;
    }
    Ok(())
}

/// The vCPU's MPIDR_EL1 affinity (Aff3..Aff0, bit 31 and MT cleared): the
/// value the MADT's GICC entries and the device tree's cpu nodes carry.
pub fn mpidr(fd: &VcpuFd) -> Result<u64, Error> {
    Ok(get(fd, MPIDR_EL1, "MPIDR_EL1")? & 0xff_00ff_ffff)
}

/// Where the vCPU is: PC, PSTATE, SP, and the EL1 exception registers
/// (the last exception the guest took), for a stopped or stuck vCPU.
pub fn describe(fd: &VcpuFd) -> String {
    let mut parts = Vec::new();
    for (name, id) in [
        ("pc", PC),
        ("pstate", PSTATE),
        ("sp", SP),
        ("sp_el1", SP_EL1),
        ("elr_el1", ELR_EL1),
        ("esr_el1", ESR_EL1),
        ("far_el1", FAR_EL1),
    ] {
        match get(fd, id, name) {
            Ok(v) => parts.push(format!("{name} {v:#x}")),
            Err(e) => parts.push(format!("{name} unreadable ({})", e_source(&e))),
        }
    }
    match fd.get_mp_state() {
        Ok(s) => parts.push(format!("mp_state {}", s.mp_state)),
        Err(e) => parts.push(format!("mp_state unreadable ({e})")),
    }
    parts.join(", ")
}

fn e_source(e: &Error) -> String {
    std::error::Error::source(e).map_or_else(|| e.to_string(), ToString::to_string)
}
