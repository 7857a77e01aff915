//! ACPI helpers both architectures share: the AML of the hardware-error
//! event (Generic Event Device + Hardware Error Device), interrupt resource
//! descriptors, and the placement of a table set (RSDP, DSDT, FADT, further
//! tables, XSDT) into a firmware area with their links filled in.
//!
//! Pure code, compiled on every target: x86_64's [`crate::x86_64::acpi`] and
//! arm64's [`crate::aarch64::acpi`] describe their own platforms with it.

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use thiserror::Error;

/// OEM id in every table.
pub const OEM_ID: [u8; 6] = *b"RASVMM";
/// OEM table id in every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"RASVMM  ";

/// Errors placing the tables.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// The tables outgrow their area.
    #[error("ACPI tables need {need} bytes; {room} are reserved for them")]
    TooLarge {
        /// Bytes the tables take.
        need: u64,
        /// Bytes of the area.
        room: u64,
    },
}

/// The tables, placed: write each blob at its address.
#[derive(Debug)]
pub struct Tables {
    /// (guest address, bytes).
    pub blobs: Vec<(u64, Vec<u8>)>,
    /// The RSDP's address.
    pub rsdp: u64,
    /// Bytes used from the area's start.
    pub size: u64,
}

/// The bytes of an AML object or table.
pub fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// An extended interrupt descriptor: consumer, edge-triggered, active high,
/// exclusive. Every rasvmm interrupt is delivered through an irqfd, which
/// pulses the line: an edge.
pub fn edge_interrupt(gsi: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, gsi)
}

/// The Generic Event Device (ACPI0013) on `gsi` and the Hardware Error
/// Device (PNP0C33, Linux's drivers/acpi/hed.c) it notifies:
/// `Method (_EVT, 1) { If (Arg0 == gsi) { Notify (\_SB.HED_, 0x80) } }`.
/// Linux runs the GHES sources notified by GSIV from the HED notifier. Goes
/// inside `\_SB`.
pub fn error_event_aml(gsi: u32) -> Vec<u8> {
    let irq = edge_interrupt(gsi);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let hed_path: aml::Path = "\\_SB_.HED_".into();
    let notify = aml::Notify::new(&hed_path, &0x80u8);
    let is_ours = aml::Equal::new(&aml::Arg(0), &gsi);
    let when = aml::If::new(&is_ours, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&when]);
    let mut out = aml_bytes(&aml::Device::new(
        "GED0".into(),
        vec![&hid, &uid, &crs, &evt],
    ));
    let hed_hid = aml::EISAName::new("PNP0C33");
    let hed_hid = aml::Name::new("_HID".into(), &hed_hid);
    let hed_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    out.extend(aml_bytes(&aml::Device::new(
        "HED_".into(),
        vec![&hed_hid, &hed_uid],
    )));
    out
}

/// Sets the ACPI checksum byte (offset 9) so that `table` sums to zero.
pub fn set_checksum(table: &mut [u8]) {
    if let Some(c) = table.get_mut(9) {
        *c = 0;
    }
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    if let Some(c) = table.get_mut(9) {
        *c = 0u8.wrapping_sub(sum);
    }
}

/// Whether `bytes` sum to zero (a valid ACPI checksum).
pub fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
}

/// Places a table set in `start..start + room`, each table 16-byte aligned:
/// the RSDP (revision 2) at `start`, then the DSDT, the FADT that `fadt`
/// builds for the DSDT's address, the `others` in order, and the XSDT that
/// lists the FADT and the others.
pub fn place(
    start: u64,
    room: u64,
    dsdt: Vec<u8>,
    fadt: impl FnOnce(u64) -> Vec<u8>,
    others: Vec<Vec<u8>>,
) -> Result<Tables, Error> {
    let align = |a: u64| a.next_multiple_of(16);
    let rsdp_addr = start;
    let mut cursor = align(rsdp_addr + Rsdp::len() as u64);
    let mut blobs = Vec::new();
    let mut put = |b: Vec<u8>, blobs: &mut Vec<(u64, Vec<u8>)>| -> u64 {
        let at = cursor;
        cursor = align(cursor + b.len() as u64);
        blobs.push((at, b));
        at
    };
    let dsdt_addr = put(dsdt, &mut blobs);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(put(fadt(dsdt_addr), &mut blobs));
    for t in others {
        xsdt.add_entry(put(t, &mut blobs));
    }
    let xsdt_addr = put(aml_bytes(&xsdt), &mut blobs);
    blobs.push((rsdp_addr, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))));
    let size = cursor - start;
    if size > room {
        return Err(Error::TooLarge { need: size, room });
    }
    Ok(Tables {
        blobs,
        rsdp: rsdp_addr,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_fixes_the_sum() {
        let mut t = vec![7u8; 40];
        set_checksum(&mut t);
        assert!(checksum_ok(&t));
        set_checksum(&mut []);
    }

    #[test]
    fn placement_links_and_bounds() {
        let table = |sig: &[u8; 4]| {
            let mut t = vec![0u8; 36];
            t[..4].copy_from_slice(sig);
            t[4..8].copy_from_slice(&36u32.to_le_bytes());
            set_checksum(&mut t);
            t
        };
        let t = place(
            0x1000,
            0x1000,
            table(b"DSDT"),
            |d| {
                let mut f = table(b"FACP");
                f.extend_from_slice(&d.to_le_bytes());
                f
            },
            vec![table(b"APIC")],
        )
        .unwrap();
        assert_eq!(t.rsdp, 0x1000);
        let dsdt = t.blobs.iter().find(|(_, b)| &b[..4] == b"DSDT").unwrap().0;
        let facp = &t.blobs.iter().find(|(_, b)| &b[..4] == b"FACP").unwrap().1;
        assert_eq!(u64::from_le_bytes(facp[36..44].try_into().unwrap()), dsdt);
        assert!(t.blobs.iter().all(|(a, _)| a % 16 == 0));
        assert_eq!(
            place(0, 0x40, table(b"DSDT"), |_| table(b"FACP"), vec![]).unwrap_err(),
            Error::TooLarge {
                need: 0xc0,
                room: 0x40
            }
        );
    }
}
