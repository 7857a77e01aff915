//! Intel MultiProcessor Specification 1.4 tables.
//!
//! Without ACPI, Linux finds the vCPUs, the IOAPIC and the ISA interrupt
//! routing in an MP table; it looks for the floating pointer in the last KiB
//! of base memory, where this one is written (`EBDA_START`). Layouts are from
//! the MP spec, chapter 4, and match arch/x86/include/asm/mpspec_def.h.

use thiserror::Error;

use super::layout::{APIC_START, EBDA_START, IOAPIC_START};

const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MP_SPEC_REV: u8 = 4;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
const MP_IRQTYPE_INT: u8 = 0;
const MP_IRQTYPE_NMI: u8 = 1;
const MP_IRQTYPE_EXTINT: u8 = 3;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// ISA IRQs routed 1:1 to IOAPIC pins.
const ISA_IRQS: u8 = 16;
const BUS_ID_ISA: u8 = 0;

/// Size of the floating pointer structure.
const MPF_SIZE: usize = 16;
/// Size of the configuration table header.
const MPC_HEADER_SIZE: usize = 44;
#[cfg(test)]
const PROCESSOR_ENTRY_SIZE: usize = 20;
#[cfg(test)]
const SMALL_ENTRY_SIZE: usize = 8;

/// Highest vCPU count the table describes: the whole table must fit in the
/// last KiB of base memory (0x9fc00..0xa0000), 20 bytes per vCPU.
pub const MAX_CPUS: u8 = 32;

/// Errors building the MP table.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// vCPU count outside 1..=MAX_CPUS.
    #[error("MP table cannot describe {0} vCPUs (1 to {MAX_CPUS})")]
    CpuCount(u8),
}

/// The IOAPIC's id: the first after the vCPUs' APIC ids (also in the MADT).
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Builds the floating pointer and the configuration table for `num_cpus`
/// vCPUs, to be written at [`EBDA_START`]. `cpu_signature` and
/// `feature_flags` are CPUID leaf 1 EAX and EDX.
pub fn build(num_cpus: u8, cpu_signature: u32, feature_flags: u32) -> Result<Vec<u8>, Error> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::CpuCount(num_cpus));
    }
    let ioapic_id = ioapic_id(num_cpus);
    let table_addr = u32::try_from(EBDA_START + MPF_SIZE as u64).unwrap_or(0);

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..num_cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&cpu_signature.to_le_bytes());
        entries.extend_from_slice(&feature_flags.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&u32::try_from(IOAPIC_START).unwrap_or(0).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQTYPE_INT, 0, 0, BUS_ID_ISA, irq]);
        entries.extend_from_slice(&[ioapic_id, irq]);
        count += 1;
    }
    // LINT0 takes ExtINT from the PIC, LINT1 is NMI, on every local APIC.
    for (kind, dest_apic, lint) in [(MP_IRQTYPE_EXTINT, 0, 0), (MP_IRQTYPE_NMI, 0xff, 1)] {
        entries.extend_from_slice(&[MP_LINTSRC, kind, 0, 0, BUS_ID_ISA, 0, dest_apic, lint]);
        count += 1;
    }

    let length = MPC_HEADER_SIZE + entries.len();
    let mut mpc = Vec::with_capacity(length);
    mpc.extend_from_slice(MPC_SIGNATURE);
    mpc.extend_from_slice(&u16::try_from(length).unwrap_or(0).to_le_bytes());
    mpc.extend_from_slice(&[MP_SPEC_REV, 0]); // checksum patched below
    mpc.extend_from_slice(b"RASVMM  "); // OEM ID, 8 bytes
    mpc.extend_from_slice(b"000000000000"); // product ID, 12 bytes
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&count.to_le_bytes());
    mpc.extend_from_slice(&u32::try_from(APIC_START).unwrap_or(0).to_le_bytes());
    mpc.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(mpc.len(), MPC_HEADER_SIZE);
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    let mut mpf = Vec::with_capacity(MPF_SIZE + length);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]); // length in 16-byte units
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&mpc);
    Ok(mpf)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointer_are_valid() {
        let t = build(2, 0x50654, 0x178bfbff).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let ptr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        assert_eq!(u64::from(ptr), EBDA_START + 16);
        let mpc = &t[16..];
        assert_eq!(&mpc[0..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([mpc[4], mpc[5]]));
        assert_eq!(len, mpc.len());
        assert_eq!(sum(mpc), 0);
    }

    #[test]
    fn entries_describe_every_cpu_and_the_ioapic() {
        let t = build(3, 0, 0).unwrap();
        let mpc = &t[16..];
        let count = u16::from_le_bytes([mpc[34], mpc[35]]);
        assert_eq!(count, 3 + 1 + 1 + 16 + 2);
        let cpus = &mpc[44..44 + 3 * PROCESSOR_ENTRY_SIZE];
        for (i, e) in cpus.chunks(PROCESSOR_ENTRY_SIZE).enumerate() {
            assert_eq!(e[0], MP_PROCESSOR);
            assert_eq!(usize::from(e[1]), i);
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, i == 0);
        }
        let ioapic = &mpc[44 + 3 * PROCESSOR_ENTRY_SIZE + SMALL_ENTRY_SIZE..][..8];
        assert_eq!((ioapic[0], ioapic[1]), (MP_IOAPIC, 3));
        // The table fits below the end of base memory.
        assert!(EBDA_START + t.len() as u64 <= 0xa0000);
    }

    #[test]
    fn refuses_impossible_cpu_counts() {
        assert_eq!(build(0, 0, 0), Err(Error::CpuCount(0)));
        assert_eq!(
            build(MAX_CPUS + 1, 0, 0),
            Err(Error::CpuCount(MAX_CPUS + 1))
        );
        // The largest table still fits in base memory.
        let t = build(MAX_CPUS, 0, 0).unwrap();
        assert!(EBDA_START + t.len() as u64 <= 0xa0000, "{}", t.len());
    }
}
