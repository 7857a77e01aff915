//! KVM's x86 machine-check ioctls, which kvm-ioctls does not wrap, and the
//! guest-state checks that decide whether an injection is safe.
//!
//! KVM_X86_SET_MCE on an uncorrected record triple-faults the guest if
//! CR4.MCE is clear or MCG_STATUS.MCIP is still set, and silently drops it if
//! the guest disabled reporting (MCG_CTL or the bank's MCi_CTL not all
//! ones): [`check`] refuses those cases with a reason instead.

use kvm_bindings::{kvm_enable_cap, kvm_msr_entry, kvm_x86_mce, Msrs};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd,
};
use ras::mce::{MceRecord, MCG_CTL_P, MCG_STATUS_MCIP, MCI_STATUS_UC};
use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

/// The ioctl numbers, from include/uapi/linux/kvm.h.
mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::kvm_x86_mce;
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_iow_nr!(KVM_X86_SETUP_MCE, KVMIO, 0x9c, u64);
    ioctl_ior_nr!(KVM_X86_GET_MCE_CAP_SUPPORTED, KVMIO, 0x9d, u64);
    ioctl_iow_nr!(KVM_X86_SET_MCE, KVMIO, 0x9e, kvm_x86_mce);
}
use ioctls::{KVM_X86_GET_MCE_CAP_SUPPORTED, KVM_X86_SETUP_MCE, KVM_X86_SET_MCE};

/// IA32_MCG_CAP.
const MSR_IA32_MCG_CAP: u32 = 0x179;
const MSR_IA32_MCG_STATUS: u32 = 0x17a;
const MSR_IA32_MCG_CTL: u32 = 0x17b;
const MSR_IA32_MC0_CTL: u32 = 0x400;
const X86_CR4_MCE: u64 = 1 << 6;

/// Why an injection was refused or failed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// The guest has not enabled machine checks.
    #[error("vCPU {0} has CR4.MCE clear (the guest has not enabled machine checks; KVM would triple-fault it)")]
    Cr4McClear(u8),
    /// The guest is still handling an earlier machine check.
    #[error("vCPU {0} has MCG_STATUS.MCIP set (still handling a machine check; KVM would triple-fault it)")]
    McipSet(u8),
    /// The guest disabled uncorrected-error reporting globally.
    #[error("vCPU {0} has MCG_CTL {1:#x}: the guest disabled machine-check reporting")]
    McgCtlDisabled(u8, u64),
    /// The guest disabled the bank.
    #[error("vCPU {0} has MC{1}_CTL {2:#x}: the guest disabled bank {1}")]
    BankDisabled(u8, u8, u64),
    /// A KVM call failed.
    #[error("{0} failed on vCPU {1}: {2}")]
    Kvm(&'static str, u8, String),
    /// The vCPU is in the middle of delivering another event.
    #[error("vCPU {0} is delivering {1}: a machine check queued now would make KVM drop it")]
    EventInFlight(u8, String),
    /// MCG_CAP bits must be supplied by rasvmm but KVM cannot hand it the reads.
    #[error("MCG_CAP {0:#x} needs rasvmm to answer the guest's reads, but {1}")]
    McgCapFilter(u64, String),
}

/// Banks KVM allows per vCPU (KVM_CHECK_EXTENSION(KVM_CAP_MCE)), 0 without MCE.
pub fn max_banks(kvm: &Kvm) -> u64 {
    u64::try_from(kvm.check_extension_raw(kvm_bindings::KVM_CAP_MCE.into())).unwrap_or(0)
}

/// MCG_CAP bits KVM supports (KVM_X86_GET_MCE_CAP_SUPPORTED), 0 without MCE support.
pub fn cap_supported(kvm: &Kvm) -> u64 {
    let mut cap = 0u64;
    // SAFETY: the ioctl writes one u64 into `cap`, which outlives the call.
    let r = unsafe { ioctl_with_mut_ref(kvm, KVM_X86_GET_MCE_CAP_SUPPORTED(), &mut cap) };
    if r < 0 {
        0
    } else {
        cap
    }
}

/// Gives a vCPU machine-check banks (KVM_X86_SETUP_MCE); KVM sets MCG_CTL
/// and every MCi_CTL to all ones.
pub fn setup(vcpu: &VcpuFd, index: u8, mcg_cap: u64) -> Result<(), Error> {
    // SAFETY: the ioctl reads one u64 from `mcg_cap`, which outlives the call.
    let r = unsafe { ioctl_with_ref(vcpu, KVM_X86_SETUP_MCE(), &mcg_cap) };
    if r < 0 {
        return Err(Error::Kvm("KVM_X86_SETUP_MCE", index, last_error()));
    }
    Ok(())
}

/// The MCG_CAP the guest actually sees (MSR_IA32_MCG_CAP after
/// KVM_X86_SETUP_MCE). It can differ from what was set up: SVM keeps only
/// bits 8:0 (svm_setup_mce), so SER_P and LMCE_P never reach a guest on an
/// AMD host even though KVM_X86_GET_MCE_CAP_SUPPORTED lists SER_P.
pub fn effective_cap(vcpu: &VcpuFd, index: u8) -> Result<u64, Error> {
    Ok(read_msrs(vcpu, index, &[MSR_IA32_MCG_CAP])?[0])
}

/// Makes every guest read of MSR_IA32_MCG_CAP exit to rasvmm
/// (KVM_X86_SET_MSR_FILTER plus KVM_CAP_X86_USER_SPACE_MSR), so that the
/// vCPU loop answers with the MCG_CAP the profile chose, `guest_cap`,
/// including bits KVM's vCPU dropped (see [`ras::mce::supplied_cap_bits`]).
/// Writes are left to KVM, which refuses them (the MSR is read-only).
/// Call before any vCPU runs.
pub fn serve_mcg_cap_reads(kvm: &Kvm, vm: &VmFd, guest_cap: u64) -> Result<(), Error> {
    let fail = |what: String| Error::McgCapFilter(guest_cap, what);
    if !kvm.check_extension(Cap::X86UserSpaceMsr) || !kvm.check_extension(Cap::X86MsrFilter) {
        return Err(fail(
            "KVM lacks KVM_CAP_X86_USER_SPACE_MSR or KVM_CAP_X86_MSR_FILTER".into(),
        ));
    }
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| fail(format!("enabling KVM_CAP_X86_USER_SPACE_MSR failed: {e}")))?;
    // One MSR whose bit is 0: reads of it are denied by the filter and so
    // exit to user space; every other access keeps KVM's default.
    let deny = [0u8; 1];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::READ,
        base: MSR_IA32_MCG_CAP,
        msr_count: 1,
        bitmap: &deny,
    };
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
        .map_err(|e| fail(format!("KVM_X86_SET_MSR_FILTER failed: {e}")))
}

/// The answer to a guest RDMSR that [`serve_mcg_cap_reads`] sent to user
/// space: the profile's MCG_CAP for IA32_MCG_CAP, `None` (a #GP) for any
/// other MSR, which is never filtered.
pub fn filtered_rdmsr(index: u32, guest_cap: u64) -> Option<u64> {
    (index == MSR_IA32_MCG_CAP).then_some(guest_cap)
}

/// Refuses an injection KVM would turn into a triple fault or drop.
pub fn check(vcpu: &VcpuFd, index: u8, mcg_cap: u64, r: &MceRecord) -> Result<(), Error> {
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", index, e.to_string()))?;
    if r.status & MCI_STATUS_UC == 0 {
        // Corrected and deferred records are only stored in the bank.
        return Ok(());
    }
    if sregs.cr4 & X86_CR4_MCE == 0 {
        return Err(Error::Cr4McClear(index));
    }
    let bank_ctl = MSR_IA32_MC0_CTL + 4 * u32::from(r.bank);
    let msrs = read_msrs(
        vcpu,
        index,
        &[MSR_IA32_MCG_STATUS, MSR_IA32_MCG_CTL, bank_ctl],
    )?;
    if msrs[0] & MCG_STATUS_MCIP != 0 {
        return Err(Error::McipSet(index));
    }
    if mcg_cap & MCG_CTL_P != 0 && msrs[1] != u64::MAX {
        return Err(Error::McgCtlDisabled(index, msrs[1]));
    }
    if msrs[2] != u64::MAX {
        return Err(Error::BankDisabled(index, r.bank, msrs[2]));
    }
    Ok(())
}

/// The event the vCPU was delivering when it last left KVM_RUN, if its
/// delivery did not complete (an interrupt, an NMI or an exception KVM
/// re-injects on the next entry).
///
/// A machine check must not be queued then. KVM does not re-inject an
/// interrupt or NMI while an exception is pending (kvm_check_and_inject_events,
/// arch/x86/kvm/x86.c: it takes the exception to have occurred while the
/// event was vectored), and clears the event at the next exit, but the
/// local APIC has already moved the interrupt from IRR to ISR: its vector
/// stays in service with no handler to EOI it, and every interrupt of its
/// priority class and below is blocked for good. In the lab host an
/// asynchronous SRAO stalled a guest so about one time in twenty: halted
/// with the timer vector 0xec in service, PPR 0xe0, the agent's UART
/// interrupt waiting in IRR.
pub fn event_in_flight(vcpu: &VcpuFd) -> Option<String> {
    let e = vcpu.get_vcpu_events().ok()?;
    if e.exception.injected != 0 {
        Some(format!("exception {}", e.exception.nr))
    } else if e.nmi.injected != 0 {
        Some("an NMI".into())
    } else if e.interrupt.injected != 0 {
        Some(format!("interrupt vector {:#x}", e.interrupt.nr))
    } else {
        None
    }
}

/// Injects a record (KVM_X86_SET_MCE). Call [`check`] first.
pub fn inject(vcpu: &VcpuFd, index: u8, r: &MceRecord) -> Result<(), Error> {
    let mce = kvm_x86_mce {
        status: r.status,
        addr: r.addr,
        misc: r.misc,
        mcg_status: r.mcg_status,
        bank: r.bank,
        ..Default::default()
    };
    // SAFETY: the ioctl reads one kvm_x86_mce from `mce`, which outlives the call.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_X86_SET_MCE(), &mce) };
    if ret < 0 {
        return Err(Error::Kvm("KVM_X86_SET_MCE", index, last_error()));
    }
    Ok(())
}

fn read_msrs(vcpu: &VcpuFd, index: u8, list: &[u32]) -> Result<Vec<u64>, Error> {
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries)
        .map_err(|_| Error::Kvm("KVM_GET_MSRS", index, "too many MSRs".into()))?;
    let n = vcpu
        .get_msrs(&mut msrs)
        .map_err(|e| Error::Kvm("KVM_GET_MSRS", index, e.to_string()))?;
    if n != list.len() {
        return Err(Error::Kvm(
            "KVM_GET_MSRS",
            index,
            format!("read {n} of {} MSRs", list.len()),
        ));
    }
    Ok(msrs.as_slice().iter().map(|e| e.data).collect())
}

fn last_error() -> String {
    std::io::Error::last_os_error().to_string()
}
