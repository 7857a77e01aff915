//! APEI generic hardware error sources (GHESv2): the HEST that describes
//! them and the firmware side of their read-ack protocol.
//!
//! Each source has, in guest memory that the e820 map reserves:
//! - an error status address register (8 bytes) holding the address of its
//!   error status block, which the OS reads through a Generic Address;
//! - a read-ack register (8 bytes): the OS sets bit 0 once it has consumed
//!   a record (Linux: ghes_ack_error, `(val & preserve) | write`);
//! - the error status block itself ([`BLOCK_LEN`] bytes).
//!
//! The firmware rule, as in QEMU's hw/acpi/ghes.c: a record is written only
//! while the read-ack register says the previous one was acknowledged; the
//! register is then cleared and the OS notified. rasvmm never overwrites an
//! unacknowledged record: it queues the new one ([`MAX_QUEUED`] per source)
//! and writes it when the acknowledgement arrives ([`ErrorSource::pump`]).
//!
//! HEST layouts: ACPI 6.5, 18.3.2.8 (generic hardware error source version
//! 2, 92 bytes) and 18.3.2.7 (hardware error notification, 28 bytes),
//! checked against Linux 7.3 include/acpi/actbl1.h.

use std::collections::VecDeque;

use acpi_tables::sdt::{GenericAddress, Sdt};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cper;

/// Size of each error status block.
pub const BLOCK_LEN: u32 = 4096;
const _: () = assert!(BLOCK_LEN as usize == cper::MAX_RECORD_LEN);
/// Records queued per source while one is unacknowledged.
pub const MAX_QUEUED: usize = 64;
/// HEST structure type of a generic hardware error source version 2.
pub const HEST_TYPE_GENERIC_ERROR_V2: u16 = 10;
/// Size of a GHESv2 structure.
pub const GHES_V2_LEN: usize = 92;
/// The read-ack register value bit the OS sets (read_ack_write).
pub const READ_ACK_WRITE: u64 = 1;
/// Polling interval of the polled source, milliseconds.
pub const POLL_INTERVAL_MS: u32 = 100;

/// How the OS learns of a new record (ACPI 6.5 table 18.14; the ones Linux
/// 7.3 accepts on x86 and arm64, drivers/acpi/apei/ghes.c ghes_new).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Notification {
    /// Non-maskable interrupt (type 4; x86 only).
    Nmi,
    /// Synchronous External Abort (type 8; arm64 only): the VMM makes the
    /// faulting access take an external data abort, and Linux's SEA handler
    /// (ghes_notify_sea) reads the block before it decides the fault's fate.
    Sea,
    /// Global system interrupt (type 10): an edge on an interrupt line
    /// (an IOAPIC pin on x86, a GIC SPI on arm64) that the DSDT's Generic
    /// Event Device turns into a notification of the Hardware Error Device
    /// (how Linux handles GSIV sources).
    Gsiv,
    /// The OS polls the block every [`POLL_INTERVAL_MS`] (type 0).
    Polled,
}

impl Notification {
    /// Every notification type rasvmm knows, on any architecture.
    pub const ALL: [Notification; 4] = [
        Notification::Nmi,
        Notification::Sea,
        Notification::Gsiv,
        Notification::Polled,
    ];

    /// The sources of an x86_64 guest, in source-id order.
    pub const X86_64: [Notification; 3] =
        [Notification::Nmi, Notification::Gsiv, Notification::Polled];

    /// The sources of an arm64 guest, in source-id order.
    pub const AARCH64: [Notification; 3] =
        [Notification::Sea, Notification::Gsiv, Notification::Polled];

    /// The HEST notification type value.
    pub fn hest_type(self) -> u8 {
        match self {
            Notification::Polled => 0,
            Notification::Nmi => 4,
            Notification::Sea => 8,
            Notification::Gsiv => 10,
        }
    }

    /// The name used in the API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Notification::Nmi => "nmi",
            Notification::Sea => "sea",
            Notification::Gsiv => "gsiv",
            Notification::Polled => "polled",
        }
    }

    /// Parses [`Notification::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.as_str() == s)
    }
}

/// Where one error source lives in guest memory and how it notifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLayout {
    /// HEST source id.
    pub id: u16,
    /// Notification.
    pub notify: Notification,
    /// GSI for [`Notification::Gsiv`].
    pub gsi: u32,
    /// Guest address of the error status address register.
    pub status_address: u64,
    /// Guest address of the read-ack register.
    pub read_ack: u64,
    /// Guest address of the error status block.
    pub block: u64,
}

/// Lays out the x86_64 sources ([`Notification::X86_64`]) from `base`; see
/// [`layout_for`].
pub fn layout(base: u64, gsi: u32) -> (Vec<SourceLayout>, u64) {
    layout_for(&Notification::X86_64, base, gsi)
}

/// Lays out one source per entry of `notifications` (source id = index)
/// from `base`: the registers in the first page, one [`BLOCK_LEN`] block per
/// source after it. Returns the sources and the bytes used.
pub fn layout_for(notifications: &[Notification], base: u64, gsi: u32) -> (Vec<SourceLayout>, u64) {
    let sources: Vec<SourceLayout> = (0u16..)
        .zip(notifications.iter().copied())
        .map(|(id, notify)| {
            let i = u64::from(id);
            SourceLayout {
                id,
                notify,
                gsi,
                status_address: base + 16 * i,
                read_ack: base + 16 * i + 8,
                block: base + 0x1000 + u64::from(BLOCK_LEN) * i,
            }
        })
        .collect();
    let used = 0x1000 + u64::from(BLOCK_LEN) * sources.len() as u64;
    (sources, used)
}

/// The 28-byte hardware error notification structure.
fn notification_bytes(s: &SourceLayout) -> [u8; 28] {
    let mut n = [0u8; 28];
    n[0] = s.notify.hest_type();
    n[1] = 28; // length
               // config_write_enable (2..4) = 0: the OS may not reconfigure it.
    let poll = if s.notify == Notification::Polled {
        POLL_INTERVAL_MS
    } else {
        0
    };
    n[4..8].copy_from_slice(&poll.to_le_bytes());
    let vector = if s.notify == Notification::Gsiv {
        s.gsi
    } else {
        0
    };
    n[8..12].copy_from_slice(&vector.to_le_bytes());
    // Polling and error thresholds (12..28) unused.
    n
}

/// One GHESv2 structure.
pub fn ghes_v2_bytes(s: &SourceLayout) -> Vec<u8> {
    let mut b = Vec::with_capacity(GHES_V2_LEN);
    b.extend_from_slice(&HEST_TYPE_GENERIC_ERROR_V2.to_le_bytes());
    b.extend_from_slice(&s.id.to_le_bytes());
    b.extend_from_slice(&0xffffu16.to_le_bytes()); // related_source_id: none
    b.push(0); // reserved
    b.push(1); // enabled
    b.extend_from_slice(&1u32.to_le_bytes()); // records_to_preallocate
    b.extend_from_slice(&1u32.to_le_bytes()); // max_sections_per_record
    b.extend_from_slice(&BLOCK_LEN.to_le_bytes()); // max_raw_data_length
    b.extend_from_slice(gas_bytes(s.status_address).as_slice());
    b.extend_from_slice(&notification_bytes(s));
    b.extend_from_slice(&BLOCK_LEN.to_le_bytes()); // error_block_length
    b.extend_from_slice(gas_bytes(s.read_ack).as_slice());
    b.extend_from_slice(&(!READ_ACK_WRITE).to_le_bytes()); // read_ack_preserve
    b.extend_from_slice(&READ_ACK_WRITE.to_le_bytes()); // read_ack_write
    debug_assert_eq!(b.len(), GHES_V2_LEN);
    b
}

/// A 64-bit system-memory Generic Address Structure.
fn gas_bytes(addr: u64) -> [u8; 12] {
    let g = GenericAddress::mmio_address::<u64>(addr);
    let mut b = [0u8; 12];
    b[0] = g.address_space_id;
    b[1] = g.register_bit_width;
    b[2] = g.register_bit_offset;
    b[3] = g.access_size;
    b[4..12].copy_from_slice(&addr.to_le_bytes());
    b
}

/// The HEST with one GHESv2 per source.
pub fn hest(sources: &[SourceLayout], oem_id: [u8; 6], oem_table_id: [u8; 8]) -> Sdt {
    let mut t = Sdt::new(*b"HEST", 40, 1, oem_id, oem_table_id, 1);
    t.write_u32(36, u32::try_from(sources.len()).unwrap_or(0));
    for s in sources {
        t.append_slice(&ghes_v2_bytes(s));
    }
    t.update_checksum();
    t
}

/// Guest memory as an error source needs it.
pub trait StatusMemory {
    /// Reads a little-endian u64.
    fn read_u64(&self, addr: u64) -> Option<u64>;
    /// Writes bytes.
    fn write(&self, addr: u64, bytes: &[u8]) -> Option<()>;
}

/// Why a record was not accepted.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// Too many records already wait for acknowledgement.
    #[error("{0} error source has {MAX_QUEUED} records waiting for the guest's acknowledgement")]
    QueueFull(&'static str),
    /// Guest memory could not be accessed.
    #[error("cannot access the {0} error source's registers in guest memory")]
    Memory(&'static str),
    /// The record does not fit the block.
    #[error("record of {0} bytes does not fit an error status block")]
    TooLarge(usize),
}

/// What happened to a submitted record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Submitted {
    /// Written to the block; notify the OS.
    Written,
    /// Queued behind an unacknowledged record, at this position (1 = next).
    Queued(usize),
}

/// Counters of one source, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStats {
    /// Records written into the block.
    pub written: u64,
    /// Acknowledgements seen.
    pub acked: u64,
    /// Records that had to wait for an acknowledgement.
    pub queued: u64,
}

/// The firmware side of one GHESv2 source.
#[derive(Debug)]
pub struct ErrorSource {
    /// Where it lives.
    pub layout: SourceLayout,
    queue: VecDeque<Vec<u8>>,
    /// Whether a written record has not been acknowledged yet.
    outstanding: bool,
    stats: SourceStats,
}

impl ErrorSource {
    /// Initialises the registers: the status address register points at the
    /// block, the block is empty, and the read-ack register says "ready".
    pub fn new(layout: SourceLayout, mem: &dyn StatusMemory) -> Result<Self, Error> {
        let name = layout.notify.as_str();
        mem.write(layout.status_address, &layout.block.to_le_bytes())
            .ok_or(Error::Memory(name))?;
        mem.write(layout.block, &[0; 4])
            .ok_or(Error::Memory(name))?;
        mem.write(layout.read_ack, &READ_ACK_WRITE.to_le_bytes())
            .ok_or(Error::Memory(name))?;
        Ok(Self {
            layout,
            queue: VecDeque::new(),
            outstanding: false,
            stats: SourceStats::default(),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> SourceStats {
        self.stats
    }

    /// Records waiting for an acknowledgement.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether the OS acknowledged the last record written.
    fn acknowledged(&self, mem: &dyn StatusMemory) -> Result<bool, Error> {
        let v = mem
            .read_u64(self.layout.read_ack)
            .ok_or(Error::Memory(self.layout.notify.as_str()))?;
        Ok(v & READ_ACK_WRITE != 0)
    }

    /// Submits a validated record: written now if the previous one was
    /// acknowledged (and nothing is queued before it), else queued.
    pub fn submit(&mut self, record: Vec<u8>, mem: &dyn StatusMemory) -> Result<Submitted, Error> {
        if record.len() > BLOCK_LEN as usize {
            return Err(Error::TooLarge(record.len()));
        }
        self.note_ack(mem)?;
        if self.queue.is_empty() && !self.outstanding {
            self.write(&record, mem)?;
            return Ok(Submitted::Written);
        }
        if self.queue.len() >= MAX_QUEUED {
            return Err(Error::QueueFull(self.layout.notify.as_str()));
        }
        self.queue.push_back(record);
        self.stats.queued += 1;
        Ok(Submitted::Queued(self.queue.len()))
    }

    /// Checks for an acknowledgement and writes the next queued record if
    /// there is one; returns true when a record was written (notify the OS).
    pub fn pump(&mut self, mem: &dyn StatusMemory) -> Result<bool, Error> {
        self.note_ack(mem)?;
        if self.outstanding {
            return Ok(false);
        }
        match self.queue.pop_front() {
            Some(r) => {
                self.write(&r, mem)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Whether there is work for [`ErrorSource::pump`].
    pub fn waiting(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Whether a written record still waits for its acknowledgement.
    pub fn outstanding(&self) -> bool {
        self.outstanding
    }

    /// Notes an acknowledgement of the last record, if the OS gave one,
    /// without writing anything.
    pub fn note_ack(&mut self, mem: &dyn StatusMemory) -> Result<(), Error> {
        if self.outstanding && self.acknowledged(mem)? {
            self.outstanding = false;
            self.stats.acked += 1;
        }
        Ok(())
    }

    /// Writes a record: the body first, block_status (its first four bytes)
    /// last, so the OS never sees a valid status over a partial record;
    /// then clears the read-ack register.
    fn write(&mut self, record: &[u8], mem: &dyn StatusMemory) -> Result<(), Error> {
        let name = self.layout.notify.as_str();
        let block = self.layout.block;
        if record.len() > 4 {
            mem.write(block + 4, &record[4..])
                .ok_or(Error::Memory(name))?;
        }
        mem.write(self.layout.read_ack, &0u64.to_le_bytes())
            .ok_or(Error::Memory(name))?;
        mem.write(block, &record[..record.len().min(4)])
            .ok_or(Error::Memory(name))?;
        self.outstanding = true;
        self.stats.written += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::*;

    /// Byte-addressed fake guest memory.
    #[derive(Default)]
    struct Mem(RefCell<BTreeMap<u64, u8>>);

    impl StatusMemory for Mem {
        fn read_u64(&self, addr: u64) -> Option<u64> {
            let m = self.0.borrow();
            let mut v = [0u8; 8];
            for (i, b) in v.iter_mut().enumerate() {
                *b = *m.get(&(addr + i as u64)).unwrap_or(&0);
            }
            Some(u64::from_le_bytes(v))
        }
        fn write(&self, addr: u64, bytes: &[u8]) -> Option<()> {
            let mut m = self.0.borrow_mut();
            for (i, b) in bytes.iter().enumerate() {
                m.insert(addr + i as u64, *b);
            }
            Some(())
        }
    }

    impl Mem {
        /// What Linux's ghes_clear_estatus + ghes_ack_error do.
        fn os_ack(&self, s: &SourceLayout) {
            self.write(s.block, &[0; 4]);
            let v = self.read_u64(s.read_ack).unwrap();
            let v = (v & !READ_ACK_WRITE) | READ_ACK_WRITE;
            self.write(s.read_ack, &v.to_le_bytes());
        }
        fn block_status(&self, s: &SourceLayout) -> u64 {
            self.read_u64(s.block).unwrap() & 0xffff_ffff
        }
    }

    fn rec(addr: u64) -> Vec<u8> {
        cper::MemoryErrorRecord {
            severity: cper::Severity::Recoverable,
            physical_addr: addr,
            threshold_exceeded: false,
        }
        .encode()
    }

    #[test]
    fn hest_layout() {
        let (sources, used) = layout(0xf_0000, 5);
        assert_eq!(used, 0x4000);
        let t = hest(&sources, *b"RASVMM", *b"RASVMM  ");
        let b = t.as_slice();
        assert_eq!(&b[0..4], b"HEST");
        assert_eq!(b.len(), 40 + 3 * 92);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 316);
        assert_eq!(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 3);
        // Second source (GSIV): type 10, id 1, enabled, notification at +32.
        let g = &b[40 + 92..40 + 184];
        assert_eq!(u16::from_le_bytes([g[0], g[1]]), 10);
        assert_eq!(u16::from_le_bytes([g[2], g[3]]), 1);
        assert_eq!(g[7], 1);
        // Error status address GAS at +20: system memory, 64 bits, QWord.
        assert_eq!(&g[20..24], &[0, 64, 0, 4]);
        assert_eq!(u64::from_le_bytes(g[24..32].try_into().unwrap()), 0xf_0010);
        assert_eq!(g[32], 10);
        assert_eq!(g[33], 28);
        assert_eq!(u32::from_le_bytes(g[40..44].try_into().unwrap()), 5);
        assert_eq!(u32::from_le_bytes(g[60..64].try_into().unwrap()), 4096);
        // Read-ack GAS, preserve, write.
        assert_eq!(u64::from_le_bytes(g[68..76].try_into().unwrap()), 0xf_0018);
        assert_eq!(u64::from_le_bytes(g[76..84].try_into().unwrap()), !1);
        assert_eq!(u64::from_le_bytes(g[84..92].try_into().unwrap()), 1);
        // The polled source carries its interval.
        let p = &b[40 + 184..];
        assert_eq!(p[32], 0);
        assert_eq!(
            u32::from_le_bytes(p[36..40].try_into().unwrap()),
            POLL_INTERVAL_MS
        );
    }

    #[test]
    fn sources_per_architecture() {
        let (x86, _) = layout(0xf_0000, 5);
        let kinds: Vec<_> = x86.iter().map(|s| s.notify).collect();
        assert_eq!(kinds, Notification::X86_64);
        let (arm, used) = layout_for(&Notification::AARCH64, 0x4004_0000, 35);
        assert_eq!(used, 0x4000);
        assert_eq!(arm[0].notify, Notification::Sea);
        assert_eq!(arm[0].block, 0x4004_1000);
        let t = hest(&arm, *b"RASVMM", *b"RASVMM  ");
        let b = t.as_slice();
        // SEA: notification type 8 at +32 of the first GHESv2, no vector.
        assert_eq!(b[40 + 32], 8);
        assert_eq!(
            u32::from_le_bytes(b[40 + 40..40 + 44].try_into().unwrap()),
            0
        );
        // GSIV: type 10, vector = the GSI (an arm64 INTID).
        assert_eq!(b[40 + 92 + 32], 10);
        assert_eq!(
            u32::from_le_bytes(b[40 + 92 + 40..40 + 92 + 44].try_into().unwrap()),
            35
        );
        assert_eq!(Notification::parse("sea"), Some(Notification::Sea));
        assert_eq!(Notification::Sea.hest_type(), 8);
        for n in Notification::ALL {
            assert_eq!(Notification::parse(n.as_str()), Some(n));
        }
    }

    #[test]
    fn read_ack_protocol_never_overwrites() {
        let mem = Mem::default();
        let (sources, _) = layout(0xf_0000, 5);
        let s = sources[0];
        let mut src = ErrorSource::new(s, &mem).unwrap();
        assert_eq!(mem.read_u64(s.status_address), Some(s.block));
        assert_eq!(src.submit(rec(0x1000), &mem), Ok(Submitted::Written));
        assert_eq!(mem.block_status(&s), 0x11);
        assert_eq!(mem.read_u64(s.read_ack), Some(0));
        // Unacknowledged: the next two wait.
        assert_eq!(src.submit(rec(0x2000), &mem), Ok(Submitted::Queued(1)));
        assert_eq!(src.submit(rec(0x3000), &mem), Ok(Submitted::Queued(2)));
        assert_eq!(mem.read_u64(s.block + 108), Some(0x1000));
        assert_eq!(src.pump(&mem), Ok(false));
        // The OS acknowledges: the next record goes in.
        mem.os_ack(&s);
        assert_eq!(src.pump(&mem), Ok(true));
        assert_eq!(mem.read_u64(s.block + 108), Some(0x2000));
        assert_eq!(src.pump(&mem), Ok(false));
        mem.os_ack(&s);
        assert_eq!(src.pump(&mem), Ok(true));
        assert_eq!(mem.read_u64(s.block + 108), Some(0x3000));
        mem.os_ack(&s);
        assert_eq!(src.pump(&mem), Ok(false));
        assert_eq!(
            src.stats(),
            SourceStats {
                written: 3,
                acked: 3,
                queued: 2
            }
        );
        // Acknowledged and empty: written at once.
        assert_eq!(src.submit(rec(0x4000), &mem), Ok(Submitted::Written));
    }

    #[test]
    fn queue_is_bounded() {
        let mem = Mem::default();
        let (sources, _) = layout(0xf_0000, 5);
        let mut src = ErrorSource::new(sources[2], &mem).unwrap();
        src.submit(rec(0), &mem).unwrap();
        for i in 0..MAX_QUEUED {
            assert_eq!(src.submit(rec(0), &mem), Ok(Submitted::Queued(i + 1)));
        }
        assert_eq!(src.submit(rec(0), &mem), Err(Error::QueueFull("polled")));
        assert_eq!(
            src.submit(vec![0; BLOCK_LEN as usize + 1], &mem),
            Err(Error::TooLarge(BLOCK_LEN as usize + 1))
        );
    }
}
