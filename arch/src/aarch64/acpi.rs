//! ACPI tables for arm64 guests: FADT, MADT, GTDT, SPCR, DSDT, HEST and EINJ,
//! placed by the shared [`crate::acpi::place`] behind an RSDP revision 2
//! and an XSDT.
//!
//! What each table is for, as Linux 7.3 reads it:
//! - FADT (ACPI 6.3, 5.2.9): HW_REDUCED_ACPI, and the ARM boot flags
//!   PSCI_COMPLIANT | PSCI_USE_HVC, so CPUs are brought up through KVM's
//!   PSCI by HVC (arch/arm64/kernel/acpi.c acpi_psci_use_hvc);
//! - MADT (5.2.12): one 80-byte GICC per vCPU (ACPI 6.3 length, with the
//!   vCPU's MPIDR, [`super::layout::mpidr`]), the GICD (version 3) and one
//!   GICR discovery range covering every vCPU's redistributor;
//! - GTDT (5.2.24, revision 2): the architected timer PPIs with QEMU virt's
//!   flags (hw/arm/virt-acpi-build.c build_gtdt: level, active high, the
//!   non-secure EL1 timer always-on);
//! - SPCR (Microsoft's Serial Port Console Redirection, revision 2):
//!   interface type 3 (ARM PL011) at the console UART, GSIV 33;
//! - DSDT: a processor device (ACPI0007) per vCPU, the PL011s as ARMH0011
//!   devices (without them there is no ttyAMA0; Linux binds them to its
//!   SBSA flavour of the PL011 driver), and the GED + HED pair for the GHES
//!   GSIV source;
//! - HEST: the GHESv2 sources ([`ras::ghes::hest`]): SEA, GSIV, polled;
//! - EINJ: error injection ([`ras::einj::table`]) through an MMIO window.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::sdt::Sdt;
use ras::ghes::SourceLayout;

use super::layout::{self, Slot};
use crate::acpi::{aml_bytes, edge_interrupt, error_event_aml, set_checksum};
pub use crate::acpi::{Error, Tables, OEM_ID, OEM_TABLE_ID};

/// FADT ARM_BOOT_ARCH: PSCI_COMPLIANT.
pub const ARM_BOOT_ARCH_PSCI_COMPLIANT: u16 = 1 << 0;
/// FADT ARM_BOOT_ARCH: PSCI_USE_HVC.
pub const ARM_BOOT_ARCH_PSCI_USE_HVC: u16 = 1 << 1;
/// MADT revision of ACPI 6.3.
pub const MADT_REVISION: u8 = 5;
/// MADT structure type: GIC CPU interface (GICC).
pub const MADT_TYPE_GICC: u8 = 0xb;
/// MADT structure type: GIC distributor (GICD).
pub const MADT_TYPE_GICD: u8 = 0xc;
/// MADT structure type: GIC redistributor (GICR).
pub const MADT_TYPE_GICR: u8 = 0xe;
/// Length of a GICC structure in ACPI 6.3 (up to the SPE overflow interrupt).
pub const GICC_LEN: u8 = 80;
/// GICC flags: Enabled.
pub const GICC_ENABLED: u32 = 1;
/// GTDT revision 2 (ACPI 6.x without the virtual EL2 timer).
pub const GTDT_REVISION: u8 = 2;
/// Length of a revision-2 GTDT with no platform timers.
pub const GTDT_LEN: usize = 96;
/// GTDT timer flags: always-on capability.
pub const GTDT_ALWAYS_ON: u32 = 1 << 2;
/// SPCR revision 2 and its length.
pub const SPCR_REVISION: u8 = 2;
/// Length of a revision-2 SPCR.
pub const SPCR_LEN: usize = 80;
/// SPCR interface type: ARM PL011 UART.
pub const SPCR_INTERFACE_PL011: u8 = 3;
/// SPCR interrupt type: ARMH GIC interrupt (GSIV).
pub const SPCR_INTERRUPT_TYPE_GIC: u8 = 1 << 3;
/// SPCR baud rate code for 9600 (as QEMU; the emulated PL011 ignores it).
pub const SPCR_BAUD_9600: u8 = 3;

/// A PL011 the DSDT describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uart {
    /// ACPI name (four characters).
    pub name: &'static str,
    /// _UID: the ttyAMA index Linux gives it.
    pub uid: u8,
    /// Where it sits and its SPI.
    pub slot: Slot,
}

/// What the tables describe.
#[derive(Debug, Clone, Copy)]
pub struct Platform<'a> {
    /// vCPUs (MPIDRs [`layout::mpidr`] of 0..vcpus).
    pub vcpus: u8,
    /// The UARTs; the first is the console the SPCR names.
    pub uarts: &'a [Uart],
    /// The GHES sources for the HEST.
    pub ghes: &'a [SourceLayout],
    /// The INTID of the hardware-error event (GED + HED), if any.
    pub error_intid: Option<u32>,
    /// The EINJ register window's address, if the guest gets an EINJ.
    pub einj: Option<u64>,
}

fn header(sig: &[u8; 4], revision: u8) -> Sdt {
    Sdt::new(*sig, 36, revision, OEM_ID, OEM_TABLE_ID, 1)
}

fn finish(t: Sdt) -> Vec<u8> {
    let mut b = t.as_slice().to_vec();
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    b[4..8].copy_from_slice(&len.to_le_bytes());
    set_checksum(&mut b);
    b
}

/// One PL011: `_HID "ARMH0011"`, `_UID`, `_CRS` of its MMIO window and
/// its interrupt (INTID, edge).
fn uart_aml(u: &Uart) -> Vec<u8> {
    let base = u32::try_from(u.slot.base).unwrap_or(0);
    let len = u32::try_from(u.slot.len).unwrap_or(0);
    let mem = aml::Memory32Fixed::new(true, base, len);
    let irq = edge_interrupt(u.slot.intid());
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let hid = aml::Name::new("_HID".into(), &"ARMH0011");
    let uid = aml::Name::new("_UID".into(), &u.uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml_bytes(&aml::Device::new(u.name.into(), vec![&hid, &uid, &crs]))
}

/// One processor device (`ACPI0007`) per vCPU, `_UID` = the GICC's ACPI
/// processor UID, as QEMU virt has: with ACPI_HOTPLUG_CPU, arm64 Linux
/// registers a CPU's device only once its processor object is found
/// (arch/arm64/kernel/smp.c arch_register_cpu), and without them
/// /sys/devices/system/cpu/cpuN is missing (a topology_add_dev WARNING).
fn processors_aml(vcpus: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..vcpus {
        let hid = aml::Name::new("_HID".into(), &"ACPI0007");
        let uid = aml::Name::new("_UID".into(), &u32::from(i));
        out.extend(aml_bytes(&aml::Device::new(
            format!("C{i:03X}").as_str().into(),
            vec![&hid, &uid],
        )));
    }
    out
}

/// The DSDT: the processors, the UARTs, and the error event devices if
/// there is an error interrupt.
pub fn dsdt(vcpus: u8, uarts: &[Uart], error_intid: Option<u32>) -> Vec<u8> {
    let mut sb = processors_aml(vcpus);
    for u in uarts {
        sb.extend(uart_aml(u));
    }
    if let Some(intid) = error_intid {
        sb.extend(error_event_aml(intid));
    }
    let mut t = header(b"DSDT", 6);
    t.append_slice(&aml::Scope::raw("_SB_".into(), sb));
    finish(t)
}

/// The FADT: 6.3, hardware-reduced, PSCI by HVC.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi);
    f.fadt_minor_version = 3;
    f.arm_boot_arch = (ARM_BOOT_ARCH_PSCI_COMPLIANT | ARM_BOOT_ARCH_PSCI_USE_HVC).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"RASVMM\0\0").into();
    aml_bytes(&f.finalize())
}

/// One GICC (ACPI 6.3 table 5.62; Linux struct acpi_madt_generic_interrupt).
fn gicc(index: u8) -> [u8; GICC_LEN as usize] {
    let mut g = [0u8; GICC_LEN as usize];
    g[0] = MADT_TYPE_GICC;
    g[1] = GICC_LEN;
    g[4..8].copy_from_slice(&u32::from(index).to_le_bytes()); // CPU interface number
    g[8..12].copy_from_slice(&u32::from(index).to_le_bytes()); // ACPI processor UID
    g[12..16].copy_from_slice(&GICC_ENABLED.to_le_bytes());
    // Parking protocol, performance interrupt, parked address, GICC/GICV/
    // GICH bases, VGIC maintenance interrupt and GICR base (16..68): 0; a
    // GICv3 CPU interface is system registers and the GICR structure
    // gives the redistributors.
    g[68..76].copy_from_slice(&layout::mpidr(index).to_le_bytes());
    // Processor power efficiency class, reserved, SPE overflow: 0.
    g
}

/// The MADT: a GICC per vCPU, the GICD and one GICR range.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = header(b"APIC", MADT_REVISION);
    // Local interrupt controller address and flags: 0 on arm64.
    t.append_slice(&[0u8; 8]);
    for i in 0..vcpus {
        t.append_slice(&gicc(i));
    }
    let mut d = [0u8; 24];
    d[0] = MADT_TYPE_GICD;
    d[1] = 24;
    d[8..16].copy_from_slice(&layout::GIC_DIST_START.to_le_bytes());
    d[20] = 3; // GIC version
    t.append_slice(&d);
    let mut r = [0u8; 16];
    r[0] = MADT_TYPE_GICR;
    r[1] = 16;
    r[4..12].copy_from_slice(&layout::GIC_REDIST_START.to_le_bytes());
    let len = u32::try_from(layout::gic_redist_size(vcpus)).unwrap_or(0);
    r[12..16].copy_from_slice(&len.to_le_bytes());
    t.append_slice(&r);
    finish(t)
}

/// The GTDT: the four architected timer PPIs, no platform timers.
pub fn gtdt() -> Vec<u8> {
    let mut b = vec![0u8; GTDT_LEN - 36];
    // CntControlBase (36) = 0 and reserved, as QEMU.
    let timers = [
        (layout::TIMER_PPI_SECURE, 0),
        (layout::TIMER_PPI_NONSECURE, GTDT_ALWAYS_ON),
        (layout::TIMER_PPI_VIRTUAL, 0),
        (layout::TIMER_PPI_HYP, 0),
    ];
    for (i, (ppi, flags)) in timers.into_iter().enumerate() {
        let o = 48 - 36 + 8 * i;
        b[o..o + 4].copy_from_slice(&(ppi + layout::PPI_BASE).to_le_bytes());
        b[o + 4..o + 8].copy_from_slice(&flags.to_le_bytes());
    }
    // CntReadBase (80): none.
    b[80 - 36..88 - 36].copy_from_slice(&u64::MAX.to_le_bytes());
    // Platform timer count (88) = 0, offset (92) = 0.
    let mut t = header(b"GTDT", GTDT_REVISION);
    t.append_slice(&b);
    finish(t)
}

/// The SPCR for a PL011 at `uart`.
pub fn spcr(uart: Slot) -> Vec<u8> {
    let mut b = vec![0u8; SPCR_LEN - 36];
    let o = |abs: usize| abs - 36;
    b[o(36)] = SPCR_INTERFACE_PL011;
    // Base address GAS (40): system memory, 32 bits, DWord access.
    b[o(40)..o(44)].copy_from_slice(&[0, 32, 0, 3]);
    b[o(44)..o(52)].copy_from_slice(&uart.base.to_le_bytes());
    b[o(52)] = SPCR_INTERRUPT_TYPE_GIC;
    b[o(54)..o(58)].copy_from_slice(&uart.intid().to_le_bytes());
    b[o(58)] = SPCR_BAUD_9600;
    b[o(60)] = 1; // one stop bit
                  // Parity, flow control and terminal type (VT100): 0.
    b[o(64)..o(68)].copy_from_slice(&[0xff; 4]); // not a PCI device
    let mut t = header(b"SPCR", SPCR_REVISION);
    t.append_slice(&b);
    finish(t)
}

/// Builds and places every table at [`layout::ACPI_START`]. XSDT order:
/// FACP, APIC, GTDT, SPCR, then HEST if there are GHES sources, then EINJ
/// if the guest gets one.
pub fn build(p: &Platform<'_>) -> Result<Tables, Error> {
    let mut others = vec![madt(p.vcpus), gtdt()];
    if let Some(console) = p.uarts.first() {
        others.push(spcr(console.slot));
    }
    if !p.ghes.is_empty() {
        others.push(
            ras::ghes::hest(p.ghes, OEM_ID, OEM_TABLE_ID)
                .as_slice()
                .to_vec(),
        );
    }
    if let Some(base) = p.einj {
        others.push(
            ras::einj::table(base, OEM_ID, OEM_TABLE_ID)
                .as_slice()
                .to_vec(),
        );
    }
    crate::acpi::place(
        layout::ACPI_START,
        layout::ACPI_SIZE,
        dsdt(p.vcpus, p.uarts, p.error_intid),
        fadt,
        others,
    )
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::acpi::checksum_ok;

    const UARTS: [Uart; 2] = [
        Uart {
            name: "COM0",
            uid: 0,
            slot: layout::CONSOLE_UART,
        },
        Uart {
            name: "COM1",
            uid: 1,
            slot: layout::AGENT_UART,
        },
    ];

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn tables() -> Tables {
        let (ghes, _) =
            ras::ghes::layout_for(&ras::ghes::Notification::AARCH64, layout::GHES_START, 35);
        build(&Platform {
            vcpus: 2,
            uarts: &UARTS,
            ghes: &ghes,
            error_intid: Some(35),
            einj: Some(layout::EINJ_START),
        })
        .unwrap()
    }

    fn find<'a>(t: &'a Tables, sig: &[u8]) -> (u64, &'a [u8]) {
        t.blobs
            .iter()
            .find(|(_, b)| &b[..sig.len()] == sig)
            .map(|(a, b)| (*a, b.as_slice()))
            .unwrap()
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let t = tables();
        assert_eq!(t.rsdp, layout::ACPI_START);
        for (addr, b) in &t.blobs {
            assert_eq!(addr % 16, 0);
            assert!(
                *addr >= layout::ACPI_START && addr + b.len() as u64 <= layout::ACPI_START + t.size
            );
            if &b[..8] == b"RSD PTR " {
                assert!(checksum_ok(&b[..20]) && checksum_ok(b));
                assert_eq!(b[15], 2, "revision 2");
            } else {
                assert!(checksum_ok(b), "{:?}", std::str::from_utf8(&b[..4]));
                assert_eq!(u32_at(b, 4) as usize, b.len());
            }
        }
        let (_, xsdt) = find(&t, b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let sigs = [b"FACP", b"APIC", b"GTDT", b"SPCR", b"HEST", b"EINJ"];
        assert_eq!(entries, sigs.map(|s| find(&t, s).0).to_vec());
        assert_eq!(u64_at(find(&t, b"RSD PTR ").1, 24), find(&t, b"XSDT").0);
    }

    #[test]
    fn fadt_is_6_3_hardware_reduced_psci_hvc() {
        let t = tables();
        let (_, f) = find(&t, b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "major revision");
        assert_eq!(f[131], 3, "minor revision");
        assert_eq!(u32_at(f, 112), 1 << 20, "HW_REDUCED_ACPI");
        assert_eq!(u16_at(f, 129), 3, "PSCI_COMPLIANT | PSCI_USE_HVC");
        assert_eq!(u64_at(f, 140), find(&t, b"DSDT").0, "X_DSDT");
        assert_eq!(u32_at(f, 40), 0, "no 32-bit DSDT");
    }

    #[test]
    fn madt_gicc_gicd_gicr() {
        let m = madt(3);
        assert_eq!(m[8], 5);
        assert_eq!(m.len(), 44 + 3 * 80 + 24 + 16);
        for i in 0..3usize {
            let g = &m[44 + 80 * i..44 + 80 * (i + 1)];
            assert_eq!((g[0], g[1]), (0xb, 80));
            assert_eq!(u32_at(g, 4), i as u32, "CPU interface number");
            assert_eq!(u32_at(g, 8), i as u32, "UID");
            assert_eq!(u32_at(g, 12), 1, "enabled");
            assert_eq!(u64_at(g, 32), 0, "GICv3: no GICC base");
            assert_eq!(u64_at(g, 68), i as u64, "MPIDR");
        }
        let d = &m[44 + 240..44 + 264];
        assert_eq!((d[0], d[1]), (0xc, 24));
        assert_eq!(u64_at(d, 8), 0x0800_0000);
        assert_eq!(d[20], 3);
        let r = &m[44 + 264..];
        assert_eq!((r[0], r[1]), (0xe, 16));
        assert_eq!(u64_at(r, 4), 0x080a_0000);
        assert_eq!(u32_at(r, 12), 3 * 0x2_0000);
    }

    #[test]
    fn gtdt_as_qemu_virt() {
        let g = gtdt();
        assert_eq!(g.len(), 96);
        assert_eq!(g[8], 2);
        assert_eq!(u64_at(&g, 36), 0);
        let timers: Vec<(u32, u32)> = (0..4)
            .map(|i| (u32_at(&g, 48 + 8 * i), u32_at(&g, 52 + 8 * i)))
            .collect();
        assert_eq!(timers, vec![(29, 0), (30, 4), (27, 0), (26, 0)]);
        assert_eq!(u64_at(&g, 80), u64::MAX);
        assert_eq!(u32_at(&g, 88), 0);
    }

    #[test]
    fn spcr_names_the_console_pl011() {
        let s = spcr(layout::CONSOLE_UART);
        assert_eq!(s.len(), 80);
        assert_eq!(s[8], 2);
        assert_eq!(s[36], 3, "PL011");
        assert_eq!(&s[40..44], &[0, 32, 0, 3]);
        assert_eq!(u64_at(&s, 44), 0x0900_0000);
        assert_eq!(s[52], 8, "GIC interrupt");
        assert_eq!(u32_at(&s, 54), 33);
        assert_eq!(u16_at(&s, 64), 0xffff);
        assert_eq!(u16_at(&s, 66), 0xffff);
    }

    #[test]
    fn dsdt_has_the_uarts_and_the_error_event() {
        let d = dsdt(2, &UARTS, Some(35));
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"ARMH0011") && has(b"COM0") && has(b"COM1"));
        // Memory32Fixed: 0x86, length 9, read-write, base, length.
        assert!(has(&[0x86, 9, 0, 1, 0, 0, 0, 9, 0, 0x10, 0, 0]));
        // Extended interrupt: consumer, edge, INTID 33.
        assert!(has(&[0x89, 6, 0, 0x3, 1, 33, 0, 0, 0]));
        assert!(has(b"ACPI0013") && has(b"HED_") && has(&[0x89, 6, 0, 0x3, 1, 35, 0, 0, 0]));
        assert!(checksum_ok(&d));
        assert!(!dsdt(2, &UARTS, None).windows(4).any(|w| w == b"GED0"));
        assert!(has(b"ACPI0007") && has(b"C000") && has(b"C001"));
    }

    #[test]
    fn hest_has_the_arm64_sources() {
        let t = tables();
        let (_, h) = find(&t, b"HEST");
        assert_eq!(u32_at(h, 36), 3);
        assert_eq!(h[40 + 32], 8, "SEA");
        assert_eq!(h[40 + 92 + 32], 10, "GSIV");
        assert_eq!(u32_at(h, 40 + 92 + 40), 35);
        assert_eq!(h[40 + 184 + 32], 0, "polled");
    }
}
