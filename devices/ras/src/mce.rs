//! x86 machine-check records for memory errors.
//!
//! Bit layouts are from the Intel SDM vol. 3B, 16.3.2 (IA32_MCi_STATUS),
//! 16.3.1.2 (IA32_MCG_STATUS), 16.3.2.4 (IA32_MCi_MISC) and the AMD APM
//! vol. 2, 9.3 (MCA_STATUS with Deferred and Poison). The values are the ones
//! Linux 7.3 grades (arch/x86/kernel/cpu/mce/severity.c) and QEMU injects
//! (target/i386/kvm/kvm.c, kvm_mce_inject):
//!
//! | error | vendor | MCi_STATUS | MCG_STATUS | Linux's grading |
//! |---|---|---|---|---|
//! | SRAR data load | Intel | `0xBD80000000000134` | MCIP EIPV RIPV | action required: SIGBUS AR to the consumer, panic in kernel context |
//! | SRAO patrol scrub | Intel | `0xBD000000000000C0` | MCIP RIPV | action optional: memory_failure(pfn, 0) |
//! | UCNA | Intel | `0xBC0000000000009F` | 0 (no #MC) | deferred: memory_failure(pfn, 0) via CMCI or the poll |
//! | SRAR | AMD | VAL EN MISCV ADDRV UC POISON | MCIP EIPV RIPV | mce_severity_amd: AR in user mode (needs SUCCOR) |
//! | SRAO, UCNA | AMD | VAL EN MISCV ADDRV DEFERRED POISON | 0 (no #MC) | deferred |
//!
//! A record without UC never raises #MC through KVM (kvm_vcpu_ioctl_x86_set_mce
//! only stores it in the bank), so AMD's deferred errors and Intel's UCNA are
//! found by the guest's corrected-error interrupt where there is one, or by
//! its periodic poll of the banks. QEMU sets MCIP for AMD action-optional
//! errors; KVM ignores it there.
//!
//! MCi_MISC is `0x8c` everywhere: physical address mode (2 << 6) with the
//! address valid from bit 12 (a 4 KiB page).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// MCi_STATUS.VAL: the register holds an error.
pub const MCI_STATUS_VAL: u64 = 1 << 63;
/// MCi_STATUS.OVER: an earlier error was overwritten.
pub const MCI_STATUS_OVER: u64 = 1 << 62;
/// MCi_STATUS.UC: uncorrected.
pub const MCI_STATUS_UC: u64 = 1 << 61;
/// MCi_STATUS.EN: reporting enabled.
pub const MCI_STATUS_EN: u64 = 1 << 60;
/// MCi_STATUS.MISCV: MCi_MISC valid.
pub const MCI_STATUS_MISCV: u64 = 1 << 59;
/// MCi_STATUS.ADDRV: MCi_ADDR valid.
pub const MCI_STATUS_ADDRV: u64 = 1 << 58;
/// MCi_STATUS.PCC: processor context corrupt.
pub const MCI_STATUS_PCC: u64 = 1 << 57;
/// MCi_STATUS.S: signalled (an #MC was raised), Intel with MCG_SER_P.
pub const MCI_STATUS_S: u64 = 1 << 56;
/// MCi_STATUS.AR: action required, Intel with MCG_SER_P.
pub const MCI_STATUS_AR: u64 = 1 << 55;
/// MCA_STATUS.Deferred (AMD).
pub const MCI_STATUS_DEFERRED: u64 = 1 << 44;
/// MCA_STATUS.Poison (AMD): the error is poison consumption/creation.
pub const MCI_STATUS_POISON: u64 = 1 << 43;

/// MCG_STATUS.RIPV: the interrupted RIP is valid to restart at.
pub const MCG_STATUS_RIPV: u64 = 1 << 0;
/// MCG_STATUS.EIPV: RIP points at the instruction that caused the error.
pub const MCG_STATUS_EIPV: u64 = 1 << 1;
/// MCG_STATUS.MCIP: machine check in progress.
pub const MCG_STATUS_MCIP: u64 = 1 << 2;
/// MCG_STATUS.LMCES: the #MC was delivered to this logical CPU only.
pub const MCG_STATUS_LMCES: u64 = 1 << 3;

/// MCG_CAP.MCG_CTL_P: MCG_CTL present.
pub const MCG_CTL_P: u64 = 1 << 8;
/// MCG_CAP.MCG_CMCI_P: corrected machine-check interrupts.
pub const MCG_CMCI_P: u64 = 1 << 10;
/// MCG_CAP.MCG_SER_P: software error recovery (S and AR bits are meaningful).
pub const MCG_SER_P: u64 = 1 << 24;
/// MCG_CAP.MCG_LMCE_P: local machine checks.
pub const MCG_LMCE_P: u64 = 1 << 27;
/// MCG_CAP bits 7:0, the bank count.
pub const MCG_BANKCNT_MASK: u64 = 0xff;

/// MCi_MISC for a physical address with 4 KiB granularity.
pub const MCI_MISC_PHYS_PAGE: u64 = (2 << 6) | 12;

/// Intel MCA error codes (SDM 16.9): data load from the cache hierarchy,
/// memory-controller patrol scrub, and QEMU's and Linux's usual UCNA code.
const MCACOD_DATA_LOAD: u64 = 0x134;
const MCACOD_SCRUB: u64 = 0xc0;
const MCACOD_UCNA: u64 = 0x9f;

/// Bank rasvmm reports memory errors in, as QEMU does: bank 9 (an Intel
/// memory-controller bank on many parts; any bank below the count works for Linux).
pub const DEFAULT_BANK: u8 = 9;
/// Banks rasvmm gives each vCPU, if KVM allows that many.
pub const DEFAULT_BANK_COUNT: u8 = 10;

/// Guest CPU vendor, deciding the encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Vendor {
    /// Intel: S/AR bits with MCG_SER_P.
    Intel,
    /// AMD: Deferred/Poison bits, graded by mce_severity_amd.
    Amd,
}

/// A memory error, named by what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryError {
    /// Software recoverable action required: a load consumed poison.
    /// Synchronous, on the consuming vCPU.
    Srar,
    /// Software recoverable action optional: found by patrol scrub.
    Srao,
    /// Uncorrected no action: logged, no #MC; the guest finds it by CMCI or
    /// by polling the banks.
    Ucna,
}

impl MemoryError {
    /// The name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryError::Srar => "srar",
            MemoryError::Srao => "srao",
            MemoryError::Ucna => "ucna",
        }
    }

    /// Parses [`MemoryError::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "srar" => Some(MemoryError::Srar),
            "srao" => Some(MemoryError::Srao),
            "ucna" => Some(MemoryError::Ucna),
            _ => None,
        }
    }
}

/// How a record reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// An #MC exception (MCG_STATUS.MCIP).
    MachineCheck,
    /// Only the bank registers; the guest finds it by CMCI or by polling.
    BankOnly,
}

/// How `error` is delivered for `vendor`.
pub fn delivery(error: MemoryError, vendor: Vendor) -> Delivery {
    match (vendor, error) {
        (_, MemoryError::Srar) | (Vendor::Intel, MemoryError::Srao) => Delivery::MachineCheck,
        _ => Delivery::BankOnly,
    }
}

/// One machine-check bank record, as KVM_X86_SET_MCE takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MceRecord {
    /// Bank number.
    pub bank: u8,
    /// MCi_STATUS.
    pub status: u64,
    /// MCi_ADDR.
    pub addr: u64,
    /// MCi_MISC.
    pub misc: u64,
    /// MCG_STATUS.
    pub mcg_status: u64,
}

/// Encodes a memory error at guest-physical address `gpa`.
/// `local` marks an Intel LMCE (delivered to one vCPU only).
pub fn encode(error: MemoryError, vendor: Vendor, gpa: u64, local: bool) -> MceRecord {
    let common = MCI_STATUS_VAL | MCI_STATUS_EN | MCI_STATUS_MISCV | MCI_STATUS_ADDRV;
    let (status, mcg_status) = match (vendor, error) {
        (Vendor::Intel, MemoryError::Srar) => (
            common | MCI_STATUS_UC | MCI_STATUS_S | MCI_STATUS_AR | MCACOD_DATA_LOAD,
            MCG_STATUS_MCIP | MCG_STATUS_EIPV | MCG_STATUS_RIPV,
        ),
        (Vendor::Intel, MemoryError::Srao) => (
            common | MCI_STATUS_UC | MCI_STATUS_S | MCACOD_SCRUB,
            MCG_STATUS_MCIP | MCG_STATUS_RIPV,
        ),
        (Vendor::Intel, MemoryError::Ucna) => (common | MCI_STATUS_UC | MCACOD_UCNA, 0),
        (Vendor::Amd, MemoryError::Srar) => (
            common | MCI_STATUS_UC | MCI_STATUS_POISON,
            MCG_STATUS_MCIP | MCG_STATUS_EIPV | MCG_STATUS_RIPV,
        ),
        (Vendor::Amd, MemoryError::Srao | MemoryError::Ucna) => {
            (common | MCI_STATUS_DEFERRED | MCI_STATUS_POISON, 0)
        }
    };
    let lmce =
        if local && vendor == Vendor::Intel && delivery(error, vendor) == Delivery::MachineCheck {
            MCG_STATUS_LMCES
        } else {
            0
        };
    MceRecord {
        bank: DEFAULT_BANK,
        status,
        addr: gpa,
        misc: MCI_MISC_PHYS_PAGE,
        mcg_status: mcg_status | lmce,
    }
}

/// What a CPU without software error recovery (no MCG_SER_P) reports when a
/// load consumes poison: an uncorrected error with the processor context
/// corrupt and no restart IP, which Linux (and any OS) can only panic on.
/// rasvmm uses it when the guest's MCG_CAP lacks SER_P and its vendor needs
/// SER to recover (Intel), instead of an SRAR the guest would mis-grade and
/// retry forever.
pub fn encode_unrecoverable(gpa: u64) -> MceRecord {
    MceRecord {
        bank: DEFAULT_BANK,
        status: MCI_STATUS_VAL
            | MCI_STATUS_UC
            | MCI_STATUS_EN
            | MCI_STATUS_PCC
            | MCI_STATUS_MISCV
            | MCI_STATUS_ADDRV
            | MCACOD_DATA_LOAD,
        addr: gpa,
        misc: MCI_MISC_PHYS_PAGE,
        mcg_status: MCG_STATUS_MCIP | MCG_STATUS_EIPV,
    }
}

/// Whether a guest of `vendor` with `mcg_cap` can be told about `error`
/// recoverably: Intel grading needs MCG_SER_P; AMD's grading
/// (mce_severity_amd) depends on CPUID SUCCOR instead.
pub fn recoverable(vendor: Vendor, mcg_cap: u64) -> bool {
    vendor == Vendor::Amd || mcg_cap & MCG_SER_P != 0
}

/// Whether `record` must be delivered to every vCPU: on Intel, a record that
/// raises #MC (MCG_STATUS.MCIP) without LMCE (MCG_STATUS.LMCES) is broadcast
/// and Linux's handler waits for every CPU to enter it (SDM Vol. 3B 15.3.1.2;
/// do_machine_check's rendezvous); AMD machine checks are always local
/// (Linux sets lmce for AMD), and a companion record on another AMD vCPU
/// would be graded fatal there. The one rule for named, raw and consumed
/// errors alike.
pub fn is_broadcast(record: &MceRecord, vendor: Vendor) -> bool {
    vendor == Vendor::Intel
        && record.mcg_status & MCG_STATUS_MCIP != 0
        && record.mcg_status & MCG_STATUS_LMCES == 0
}

/// One record for one vCPU: a step of a [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// The vCPU that gets it.
    pub vcpu: u8,
    /// The record.
    pub record: MceRecord,
}

/// Which records go to which vCPUs when `record` is raised on `vcpu` of a
/// guest with `vcpus` vCPUs, in vCPU order: `record` on `vcpu` and, for a
/// broadcast, a [`broadcast_companion`] on every other vCPU. `vcpu` must be
/// below `vcpus` (the caller checks; an out-of-range `vcpu` plans nothing).
pub fn plan(record: MceRecord, vendor: Vendor, vcpu: u8, vcpus: u8) -> Vec<Planned> {
    if vcpu >= vcpus {
        return Vec::new();
    }
    if !is_broadcast(&record, vendor) {
        return vec![Planned { vcpu, record }];
    }
    let companion = broadcast_companion();
    (0..vcpus)
        .map(|v| Planned {
            vcpu: v,
            record: if v == vcpu { record } else { companion },
        })
        .collect()
}

/// The record the *other* vCPUs get when a machine check is broadcast (no
/// LMCE): QEMU's choice, an uncorrected error with no address in bank 1,
/// which Linux grades as nothing to do on that CPU while its handler
/// rendezvous with the CPU that has the real error.
pub fn broadcast_companion() -> MceRecord {
    MceRecord {
        bank: 1,
        status: MCI_STATUS_VAL | MCI_STATUS_UC,
        addr: 0,
        misc: 0,
        mcg_status: MCG_STATUS_MCIP | MCG_STATUS_RIPV,
    }
}

/// Errors validating an MCG_CAP or a raw record.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// The bank does not exist.
    #[error("Bank {bank} does not exist (the vCPU has {count} banks)")]
    Bank {
        /// Requested bank.
        bank: u8,
        /// Banks present.
        count: u8,
    },
    /// MCi_STATUS.VAL is clear: KVM refuses it and it would mean nothing.
    #[error("MCi_STATUS {0:#x} lacks VAL (bit 63)")]
    NotValid(u64),
    /// ADDRV is set but MISCV is clear, or the reverse, for a memory error.
    #[error("MCi_STATUS {0:#x} must have both ADDRV and MISCV for an address to be used")]
    AddressBits(u64),
    /// Bits only meaningful with MCG_SER_P while the vCPU lacks it.
    #[error("MCi_STATUS {0:#x} sets S or AR but MCG_CAP lacks SER_P")]
    NeedsSer(u64),
    /// MCG_STATUS with MCIP for an error that is not uncorrected.
    #[error("MCG_STATUS {mcg_status:#x} raises #MC for a corrected error (MCi_STATUS {status:#x} lacks UC)")]
    McipWithoutUc {
        /// MCi_STATUS.
        status: u64,
        /// MCG_STATUS.
        mcg_status: u64,
    },
    /// Undefined MCG_STATUS bits.
    #[error("MCG_STATUS {0:#x} sets bits other than RIPV, EIPV, MCIP and LMCES")]
    McgStatusBits(u64),
    /// LMCES without LMCE support.
    #[error("MCG_STATUS sets LMCES but MCG_CAP lacks LMCE_P")]
    NeedsLmce,
}

/// Checks a raw record against the vCPU's MCG_CAP before it reaches KVM.
pub fn validate(r: &MceRecord, mcg_cap: u64) -> Result<(), Error> {
    let count = u8::try_from(mcg_cap & MCG_BANKCNT_MASK).unwrap_or(0);
    if r.bank >= count {
        return Err(Error::Bank {
            bank: r.bank,
            count,
        });
    }
    if r.status & MCI_STATUS_VAL == 0 {
        return Err(Error::NotValid(r.status));
    }
    if (r.status & MCI_STATUS_ADDRV != 0) != (r.status & MCI_STATUS_MISCV != 0) {
        return Err(Error::AddressBits(r.status));
    }
    if r.status & (MCI_STATUS_S | MCI_STATUS_AR) != 0 && mcg_cap & MCG_SER_P == 0 {
        return Err(Error::NeedsSer(r.status));
    }
    if r.mcg_status & MCG_STATUS_MCIP != 0 && r.status & MCI_STATUS_UC == 0 {
        return Err(Error::McipWithoutUc {
            status: r.status,
            mcg_status: r.mcg_status,
        });
    }
    let known = MCG_STATUS_RIPV | MCG_STATUS_EIPV | MCG_STATUS_MCIP | MCG_STATUS_LMCES;
    if r.mcg_status & !known != 0 {
        return Err(Error::McgStatusBits(r.mcg_status));
    }
    if r.mcg_status & MCG_STATUS_LMCES != 0 && mcg_cap & MCG_LMCE_P == 0 {
        return Err(Error::NeedsLmce);
    }
    Ok(())
}

/// The MCG_CAP rasvmm gives a vCPU: up to [`DEFAULT_BANK_COUNT`] banks (KVM
/// allows `max_banks`, its KVM_CHECK_EXTENSION(KVM_CAP_MCE) answer), and of
/// the capability bits KVM supports (`supported`, from
/// KVM_X86_GET_MCE_CAP_SUPPORTED, which carries no bank count) MCG_CTL_P,
/// SER_P, and LMCE_P/CMCI_P where offered. 0 when KVM offers no banks.
pub fn mcg_cap(supported: u64, max_banks: u64) -> u64 {
    let banks = max_banks.min(u64::from(DEFAULT_BANK_COUNT));
    if banks == 0 {
        return 0;
    }
    let wanted = MCG_CTL_P | MCG_SER_P | MCG_LMCE_P | MCG_CMCI_P;
    banks | (supported & wanted)
}

/// MCG_CAP bits rasvmm must supply itself by answering the guest's reads of
/// MSR_IA32_MCG_CAP: what it set up (`wanted`) but KVM's vCPU lost
/// (`effective`, read back after KVM_X86_SETUP_MCE), where the bit only
/// tells the guest how to read MCi_STATUS and KVM needs no part in it.
///
/// That is SER_P on an Intel profile: KVM on SVM lists SER_P in
/// KVM_X86_GET_MCE_CAP_SUPPORTED yet keeps only MCG_CAP bits 8:0
/// (svm_setup_mce), and without it Linux cannot grade SRAR/SRAO (S and AR
/// are plain status bits to KVM). LMCE_P and CMCI_P are never supplied: they
/// need KVM's MCG_EXT_CTL and MCi_CTL2. AMD parts do not set SER_P.
pub fn supplied_cap_bits(vendor: Vendor, wanted: u64, effective: u64) -> u64 {
    if vendor != Vendor::Intel || effective & MCG_BANKCNT_MASK == 0 {
        return 0;
    }
    wanted & !effective & MCG_SER_P
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intel_encodings_match_linux_and_qemu() {
        let gpa = 0x200_0000;
        let srar = encode(MemoryError::Srar, Vendor::Intel, gpa, false);
        assert_eq!(srar.status, 0xBD80_0000_0000_0134);
        assert_eq!(srar.mcg_status, 0x7);
        assert_eq!((srar.addr, srar.misc, srar.bank), (gpa, 0x8c, 9));
        let srao = encode(MemoryError::Srao, Vendor::Intel, gpa, false);
        assert_eq!(srao.status, 0xBD00_0000_0000_00C0);
        assert_eq!(srao.mcg_status, 0x5);
        let ucna = encode(MemoryError::Ucna, Vendor::Intel, gpa, false);
        assert_eq!(ucna.status, 0xBC00_0000_0000_009F);
        assert_eq!(ucna.mcg_status, 0);
    }

    #[test]
    fn lmce_only_for_intel_machine_checks() {
        assert_eq!(
            encode(MemoryError::Srar, Vendor::Intel, 0, true).mcg_status,
            0xf
        );
        assert_eq!(
            encode(MemoryError::Ucna, Vendor::Intel, 0, true).mcg_status,
            0
        );
        assert_eq!(
            encode(MemoryError::Srar, Vendor::Amd, 0, true).mcg_status,
            0x7
        );
    }

    #[test]
    fn amd_encodings_carry_poison_and_deferred() {
        let ar = encode(MemoryError::Srar, Vendor::Amd, 0x1000, false);
        assert_eq!(
            ar.status,
            MCI_STATUS_VAL
                | MCI_STATUS_EN
                | MCI_STATUS_MISCV
                | MCI_STATUS_ADDRV
                | MCI_STATUS_UC
                | MCI_STATUS_POISON
        );
        assert_eq!(
            ar.status & (MCI_STATUS_PCC | MCI_STATUS_DEFERRED),
            0,
            "recoverable: no PCC"
        );
        let ao = encode(MemoryError::Srao, Vendor::Amd, 0x1000, false);
        assert_ne!(ao.status & MCI_STATUS_DEFERRED, 0);
        assert_ne!(
            ao.status & MCI_STATUS_POISON,
            0,
            "usable address needs POISON"
        );
        assert_eq!(ao.status & MCI_STATUS_UC, 0);
        assert_eq!(ao.mcg_status, 0, "KVM stores a non-UC record without #MC");
        assert_eq!(delivery(MemoryError::Srao, Vendor::Amd), Delivery::BankOnly);
        assert_eq!(
            delivery(MemoryError::Srao, Vendor::Intel),
            Delivery::MachineCheck
        );
        assert_eq!(
            delivery(MemoryError::Ucna, Vendor::Intel),
            Delivery::BankOnly
        );
    }

    #[test]
    fn every_encoding_passes_validation_with_ser() {
        let cap = mcg_cap(MCG_CTL_P | MCG_SER_P, 32);
        for v in [Vendor::Intel, Vendor::Amd] {
            for e in [MemoryError::Srar, MemoryError::Srao, MemoryError::Ucna] {
                let r = encode(e, v, 0x1000, false);
                assert_eq!(validate(&r, cap), Ok(()), "{v:?} {e:?}");
            }
        }
    }

    #[test]
    fn raw_records_are_checked() {
        let cap = mcg_cap(MCG_CTL_P | MCG_SER_P, 32);
        let good = encode(MemoryError::Srao, Vendor::Intel, 0x1000, false);
        assert_eq!(
            validate(&MceRecord { bank: 10, ..good }, cap),
            Err(Error::Bank {
                bank: 10,
                count: 10
            })
        );
        let r = MceRecord {
            status: good.status & !MCI_STATUS_VAL,
            ..good
        };
        assert_eq!(validate(&r, cap), Err(Error::NotValid(r.status)));
        let r = MceRecord {
            status: good.status & !MCI_STATUS_MISCV,
            ..good
        };
        assert_eq!(validate(&r, cap), Err(Error::AddressBits(r.status)));
        assert_eq!(
            validate(&good, MCG_CTL_P | 10),
            Err(Error::NeedsSer(good.status))
        );
        let r = MceRecord {
            status: good.status & !MCI_STATUS_UC,
            ..good
        };
        assert!(matches!(
            validate(&r, cap),
            Err(Error::McipWithoutUc { .. })
        ));
        let r = MceRecord {
            mcg_status: 0x15,
            ..good
        };
        assert_eq!(validate(&r, cap), Err(Error::McgStatusBits(0x15)));
        let r = encode(MemoryError::Srar, Vendor::Intel, 0, true);
        assert_eq!(validate(&r, cap), Err(Error::NeedsLmce));
        assert_eq!(validate(&r, cap | MCG_LMCE_P), Ok(()));
    }

    #[test]
    fn mcg_cap_takes_only_what_kvm_offers() {
        // SVM (the lab host) and PVM: MCG_CTL_P | MCG_SER_P, 32 banks.
        let svm = MCG_CTL_P | MCG_SER_P;
        assert_eq!(mcg_cap(svm, 32), MCG_CTL_P | MCG_SER_P | 10);
        // VMX adds LMCE_P and CMCI_P.
        let vmx = svm | MCG_LMCE_P | MCG_CMCI_P;
        assert_eq!(mcg_cap(vmx, 32), vmx | 10);
        // Fewer banks than wanted: keep KVM's count; none: no MCE at all.
        assert_eq!(mcg_cap(MCG_SER_P, 6) & MCG_BANKCNT_MASK, 6);
        assert_eq!(mcg_cap(svm, 0), 0);
        // Bits KVM does not know are never claimed.
        assert_eq!(mcg_cap(1 << 11 | svm, 32) & (1 << 11), 0);
    }

    #[test]
    fn broadcast_companion_is_valid_and_addressless() {
        let r = broadcast_companion();
        assert_eq!(validate(&r, mcg_cap(MCG_CTL_P | MCG_SER_P, 32)), Ok(()));
        assert_eq!(r.status & (MCI_STATUS_ADDRV | MCI_STATUS_EN), 0);
        assert_eq!(r.mcg_status, MCG_STATUS_MCIP | MCG_STATUS_RIPV);
    }

    #[test]
    fn only_ser_p_is_supplied_and_only_to_intel() {
        let wanted = MCG_CTL_P | MCG_SER_P | 10;
        // SVM: SETUP_MCE kept bits 8:0.
        let svm = wanted & 0x1ff;
        assert_eq!(supplied_cap_bits(Vendor::Intel, wanted, svm), MCG_SER_P);
        assert_eq!(supplied_cap_bits(Vendor::Amd, wanted, svm), 0);
        // VMX keeps SER_P: nothing to supply.
        assert_eq!(supplied_cap_bits(Vendor::Intel, wanted, wanted), 0);
        // Never LMCE_P or CMCI_P, never a bit that was not wanted, never without banks.
        let vmx_wanted = wanted | MCG_LMCE_P | MCG_CMCI_P;
        assert_eq!(supplied_cap_bits(Vendor::Intel, vmx_wanted, svm), MCG_SER_P);
        assert_eq!(supplied_cap_bits(Vendor::Intel, MCG_CTL_P | 10, svm), 0);
        assert_eq!(supplied_cap_bits(Vendor::Intel, wanted, 0), 0);
    }

    #[test]
    fn without_ser_intel_consumption_is_fatal() {
        let no_ser = MCG_CTL_P | 10;
        assert!(!recoverable(Vendor::Intel, no_ser));
        assert!(recoverable(Vendor::Amd, no_ser));
        assert!(recoverable(Vendor::Intel, no_ser | MCG_SER_P));
        let srar = encode(MemoryError::Srar, Vendor::Intel, 0x1000, false);
        assert_eq!(validate(&srar, no_ser), Err(Error::NeedsSer(srar.status)));
        let fatal = encode_unrecoverable(0x1000);
        assert_eq!(validate(&fatal, no_ser), Ok(()));
        assert_ne!(fatal.status & MCI_STATUS_PCC, 0);
        assert_eq!(fatal.mcg_status & MCG_STATUS_RIPV, 0);
    }

    #[test]
    fn only_intel_machine_checks_are_broadcast() {
        let b = |e, v, local| is_broadcast(&encode(e, v, 0x1000, local), v);
        assert!(b(MemoryError::Srar, Vendor::Intel, false));
        assert!(b(MemoryError::Srao, Vendor::Intel, false));
        assert!(!b(MemoryError::Srar, Vendor::Intel, true), "LMCE");
        assert!(!b(MemoryError::Ucna, Vendor::Intel, false), "bank only");
        assert!(!b(MemoryError::Srar, Vendor::Amd, false), "AMD is local");
        assert!(!b(MemoryError::Srao, Vendor::Amd, false), "AMD deferred");
        // A non-SER CPU's consumption report is an #MC: broadcast on Intel.
        assert!(is_broadcast(&encode_unrecoverable(0x1000), Vendor::Intel));
    }

    #[test]
    fn plan_puts_the_record_on_its_vcpu_and_companions_elsewhere() {
        use MemoryError::*;
        // (error, vendor, local) -> vCPUs with a companion, of 4, target 2.
        let cases: &[(MemoryError, Vendor, bool, &[u8])] = &[
            (Srar, Vendor::Intel, false, &[0, 1, 3]),
            (Srao, Vendor::Intel, false, &[0, 1, 3]),
            (Ucna, Vendor::Intel, false, &[]),
            (Srar, Vendor::Intel, true, &[]),
            (Srar, Vendor::Amd, false, &[]),
            (Srao, Vendor::Amd, false, &[]),
            (Ucna, Vendor::Amd, false, &[]),
        ];
        for &(e, v, local, companions) in cases {
            let record = encode(e, v, 0x2000_0000, local);
            let p = plan(record, v, 2, 4);
            let what = format!("{e:?} {v:?} local={local}");
            assert!(p.contains(&Planned { vcpu: 2, record }), "{what}");
            let others: Vec<&Planned> = p.iter().filter(|x| x.vcpu != 2).collect();
            let vcpus: Vec<u8> = others.iter().map(|x| x.vcpu).collect();
            assert_eq!(vcpus, companions, "{what}");
            assert!(others.iter().all(|x| x.record == broadcast_companion()));
            assert!(p.windows(2).all(|w| w[0].vcpu < w[1].vcpu), "vCPU order");
        }
        let one = plan(encode(Srar, Vendor::Intel, 0, false), Vendor::Intel, 0, 1);
        assert_eq!(one.len(), 1, "a single vCPU has no companions");
        assert!(plan(broadcast_companion(), Vendor::Intel, 4, 4).is_empty());
    }

    #[test]
    fn names_round_trip() {
        for e in [MemoryError::Srar, MemoryError::Srao, MemoryError::Ucna] {
            assert_eq!(MemoryError::parse(e.as_str()), Some(e));
        }
        assert_eq!(MemoryError::parse("sea"), None);
    }
}
