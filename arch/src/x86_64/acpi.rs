//! ACPI tables for x86_64 guests: RSDP, XSDT, FADT, MADT, DSDT, plus any
//! tables the caller adds (rasvmm adds the HEST and the EINJ).
//!
//! The platform is hardware-reduced ACPI, as in Cloud Hypervisor and
//! Firecracker: no SCI, no PM1 blocks; power-off goes through the FADT's
//! sleep control register and reset through its reset register, both ports
//! of rasvmm's power device ([`POWER_PORT`]). The DSDT names the devices
//! rasvmm has: the two 16550 UARTs, the i8042 reset controller, the CMOS
//! and the power device, and the `_S5` sleep type Linux needs to power off.
//!
//! With an error interrupt, the DSDT also has the hardware-reduced way to
//! signal hardware errors: a Generic Event Device (ACPI0013) on that GSI
//! whose `_EVT` notifies the Hardware Error Device (PNP0C33, Linux's
//! drivers/acpi/hed.c), which runs the GHES sources notified by GSIV.
//!
//! Tables live from [`ACPI_START`]; the RSDP comes first, 16-byte aligned,
//! inside the BIOS area Linux scans, and the zero page points at it too.
//! The generic tables use the `acpi_tables` crate; all are checksummed.
//! The architecture-neutral parts (the error event AML, table placement)
//! are shared with arm64 in [`crate::acpi`].

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{aml, Aml};

use super::layout::{ACPI_SIZE, ACPI_START, APIC_START, IOAPIC_START};
use crate::acpi::{aml_bytes as bytes, edge_interrupt, error_event_aml};
pub use crate::acpi::{Error, Tables, OEM_ID, OEM_TABLE_ID};
/// The power device: sleep control (+0), sleep status (+1), reset (+2).
pub const POWER_PORT: u16 = 0x600;
/// Ports the power device decodes.
pub const POWER_PORT_LEN: u8 = 3;
/// Value the reset register takes to reset.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP for S5 in `_S5`, as the sleep control register carries it.
pub const SLP_TYP_S5: u8 = 5;
/// Sleep control register: SLP_EN (ACPI 6.5, 4.8.3.7).
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control register: SLP_TYPx field.
pub const SLP_TYP_SHIFT: u8 = 2;
/// IAPC_BOOT_ARCH: no VGA.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// An ISA device the DSDT describes.
#[derive(Debug, Clone, Copy)]
pub struct IsaDevice {
    /// ACPI name (four characters).
    pub name: &'static str,
    /// EISA id (`PNP0501`).
    pub hid: &'static str,
    /// _UID.
    pub uid: u8,
    /// First port.
    pub port: u16,
    /// Ports decoded.
    pub len: u8,
    /// ISA IRQ, if it interrupts.
    pub irq: Option<u32>,
}

/// What the tables describe.
pub struct Platform<'a> {
    /// vCPUs (APIC ids 0..vcpus).
    pub vcpus: u8,
    /// The IOAPIC's id.
    pub ioapic_id: u8,
    /// ISA devices.
    pub devices: &'a [IsaDevice],
    /// Further tables to list in the XSDT (already checksummed).
    pub extra: &'a [Sdt],
    /// The GSI of the hardware-error event (GED + HED), if any.
    pub error_gsi: Option<u32>,
}

/// One device: `_HID`, `_UID` and a `_CRS` of one I/O range and maybe an IRQ.
fn device_aml(name: &str, hid: &str, uid: u8, port: u16, len: u8, irq: Option<u32>) -> Vec<u8> {
    let io = aml::IO::new(port, port, 1, len);
    let irq = irq.map(edge_interrupt);
    let mut res: Vec<&dyn Aml> = vec![&io];
    if let Some(i) = &irq {
        res.push(i);
    }
    let crs = aml::ResourceTemplate::new(res);
    let hid = aml::EISAName::new(hid);
    let hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    bytes(&aml::Device::new(name.into(), vec![&hid, &uid, &crs]))
}

/// The DSDT: the ISA devices, the power device, `_S5`, and the error event
/// devices if there is an error GSI.
pub fn dsdt(devices: &[IsaDevice], error_gsi: Option<u32>) -> Sdt {
    let mut sb = Vec::new();
    for d in devices {
        sb.extend(device_aml(d.name, d.hid, d.uid, d.port, d.len, d.irq));
    }
    // The power device's ports, as motherboard resources.
    sb.extend(device_aml(
        "PWRD",
        "PNP0C02",
        0,
        POWER_PORT,
        POWER_PORT_LEN,
        None,
    ));
    if let Some(gsi) = error_gsi {
        sb.extend(error_event_aml(gsi));
    }
    let mut body = aml::Scope::raw("_SB_".into(), sb);
    let s5 = aml::Package::new(vec![&SLP_TYP_S5, &aml::ZERO, &aml::ZERO, &aml::ZERO]);
    body.extend(bytes(&aml::Name::new("_S5_".into(), &s5)));
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    t.append_slice(&body);
    t.update_checksum();
    t
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    f.reset_reg = io(POWER_PORT + 2);
    f.reset_value = RESET_VALUE;
    f.sleep_control_reg = io(POWER_PORT);
    f.sleep_status_reg = io(POWER_PORT + 1);
    f.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"RASVMM\0\0").into();
    bytes(&f.finalize())
}

fn madt(vcpus: u8, ioapic_id: u8) -> Vec<u8> {
    let apic = u32::try_from(APIC_START).unwrap_or(0);
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(apic),
    );
    for i in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    let ioapic = u32::try_from(IOAPIC_START).unwrap_or(0);
    m.add_structure(IoApic::new(ioapic_id, ioapic, 0));
    bytes(&m)
}

/// Builds and places every table.
pub fn build(p: &Platform<'_>) -> Result<Tables, Error> {
    let mut others = vec![madt(p.vcpus, p.ioapic_id)];
    others.extend(p.extra.iter().map(|t| t.as_slice().to_vec()));
    crate::acpi::place(
        ACPI_START,
        ACPI_SIZE,
        dsdt(p.devices, p.error_gsi).as_slice().to_vec(),
        fadt,
        others,
    )
}

/// What a write to the power device asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    /// S5: power off.
    PowerOff,
    /// The reset register was written with [`RESET_VALUE`].
    Reset,
}

/// Decodes a byte written at `offset` of the power device.
pub fn power_request(offset: u16, value: u8) -> Option<PowerRequest> {
    match offset {
        0 if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & 0x7 == SLP_TYP_S5 => {
            Some(PowerRequest::PowerOff)
        }
        2 if value == RESET_VALUE => Some(PowerRequest::Reset),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICES: [IsaDevice; 2] = [
        IsaDevice {
            name: "COM1",
            hid: "PNP0501",
            uid: 1,
            port: 0x3f8,
            len: 8,
            irq: Some(4),
        },
        IsaDevice {
            name: "PS2K",
            hid: "PNP0303",
            uid: 0,
            port: 0x60,
            len: 1,
            irq: None,
        },
    ];

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn find<'a>(t: &'a Tables, sig: &[u8]) -> &'a [u8] {
        &t.blobs
            .iter()
            .find(|(_, b)| &b[..sig.len()] == sig)
            .unwrap()
            .1
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let hest = Sdt::new(*b"HEST", 40, 1, OEM_ID, OEM_TABLE_ID, 1);
        let extra = [hest];
        let t = build(&Platform {
            vcpus: 2,
            ioapic_id: 2,
            devices: &DEVICES,
            extra: &extra,
            error_gsi: Some(5),
        })
        .unwrap();
        assert_eq!(t.rsdp, ACPI_START);
        for (addr, b) in &t.blobs {
            assert_eq!(addr % 16, 0);
            assert!(*addr >= ACPI_START && addr + b.len() as u64 <= ACPI_START + t.size);
            if &b[..8] == b"RSD PTR " {
                assert!(checksum_ok(&b[..20]) && checksum_ok(b));
            } else {
                assert!(checksum_ok(b), "{:?}", std::str::from_utf8(&b[..4]));
                assert_eq!(u32_at(b, 4) as usize, b.len());
            }
        }
        let addr_of = |sig: &[u8]| t.blobs.iter().find(|(_, b)| &b[..4] == sig).unwrap().0;
        let rsdp = find(&t, b"RSD PTR ");
        assert_eq!(u64_at(rsdp, 24), addr_of(b"XSDT"));
        let xsdt = find(&t, b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(
            entries,
            vec![addr_of(b"FACP"), addr_of(b"APIC"), addr_of(b"HEST")]
        );
        let fadt = find(&t, b"FACP");
        assert_eq!(u64_at(fadt, 140), addr_of(b"DSDT"));
        // HW_REDUCED_ACPI | RESET_REG_SUP.
        assert_eq!(u32_at(fadt, 112), (1 << 20) | (1 << 10));
        // Sleep control at 244, status at 256: system I/O, the power ports.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(fadt, 248), u64::from(POWER_PORT));
        assert_eq!(u64_at(fadt, 260), u64::from(POWER_PORT) + 1);
        assert_eq!(u64_at(fadt, 120), u64::from(POWER_PORT) + 2);
        assert_eq!(fadt[128], RESET_VALUE);
        // MADT: two LAPICs and the IOAPIC.
        let madt = find(&t, b"APIC");
        assert_eq!(u64::from(u32_at(madt, 36)), APIC_START);
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[52..56], &[0, 8, 1, 1]);
        assert_eq!(&madt[60..64], &[1, 12, 2, 0]);
        assert_eq!(u64::from(u32_at(madt, 64)), IOAPIC_START);
    }

    #[test]
    fn dsdt_names_devices_and_s5() {
        let d = dsdt(&DEVICES, Some(5));
        let b = d.as_slice();
        let has = |needle: &[u8]| b.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_SB_") && has(b"COM1") && has(b"PS2K") && has(b"PWRD"));
        // The error event: GED with _EVT notifying HED_ (Notify op 0x86, 0x80).
        assert!(has(b"ACPI0013") && has(b"GED0") && has(b"_EVT") && has(b"HED_"));
        // Notify (0x86) \_SB_.HED_ (root, dual-name prefix 0x2e), byte 0x80.
        assert!(has(b"\\\x2e_SB_HED_\x0a\x80") && has(&[0x86, b'\\']));
        assert!(!dsdt(&DEVICES, None)
            .as_slice()
            .windows(4)
            .any(|w| w == b"GED0"));
        assert!(has(b"_S5_"));
        // COM1's I/O descriptor: 0x47, decode16, 0x3f8..0x3f8, align 1, 8 ports.
        assert!(has(&[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
        // Its extended interrupt descriptor: consumer, edge, IRQ 4.
        assert!(has(&[0x89, 6, 0, 0x3, 1, 4, 0, 0, 0]));
    }

    #[test]
    fn power_requests() {
        assert_eq!(power_request(0, 0x34), Some(PowerRequest::PowerOff));
        assert_eq!(power_request(0, 0x14), None); // SLP_EN clear
        assert_eq!(power_request(0, 0x2c), None); // S3
        assert_eq!(power_request(2, 1), Some(PowerRequest::Reset));
        assert_eq!(power_request(2, 0), None);
        assert_eq!(power_request(1, 0x80), None);
    }
}
