//! Firmware-first memory-error reporting: rasvmm as the platform firmware
//! behind the guest's APEI GHESv2 error sources.
//!
//! One source per notification of the architecture ([`arch::ras::GHES_SOURCES`]:
//! NMI, GSIV, polled on x86; SEA, GSIV, polled on arm64) lives in guest
//! memory the firmware tables reserve. A report is a validated CPER record
//! ([`ras::cper`]) written into the source's error status block under the
//! read-ack rule, followed by the notification: an NMI or an SEA on a vCPU,
//! a pulse on the machine's GHES interrupt, or nothing (the guest polls).
//! Records that arrive while the previous one is unacknowledged wait in the
//! source's queue; the session pumps the queues while any record waits.
//!
//! The guest's own decode of each record ("[Hardware Error]: ...
//! physical_address: 0x...") is picked out of the console by
//! [`decoded_address`], so a run can check that what Linux read is what
//! rasvmm wrote.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ras::cper::{self, MemoryErrorRecord, Severity};
use ras::ghes::{self as hest, ErrorSource, Notification, SourceLayout, StatusMemory, Submitted};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory, as the error sources read and write it.
struct Memory<'a>(&'a GuestMemoryMmap);

impl StatusMemory for Memory<'_> {
    fn read_u64(&self, addr: u64) -> Option<u64> {
        self.0.read_obj::<u64>(GuestAddress(addr)).ok()
    }
    fn write(&self, addr: u64, bytes: &[u8]) -> Option<()> {
        self.0.write_slice(bytes, GuestAddress(addr)).ok()
    }
}

/// Errors reporting through GHES.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// This guest has no HEST (a raw payload, not Linux).
    #[error("this guest has no ACPI error sources (GHES needs a Linux boot)")]
    NoSources,
    /// A raw record that does not validate.
    #[error("invalid CPER record: {0}")]
    Record(#[from] cper::Error),
    /// The source refused it.
    #[error("{0}")]
    Source(#[from] hest::Error),
}

/// How long a guest may keep re-executing an access to a poisoned page it
/// was told about through GHES before rasvmm reports the access as a
/// machine check instead.
pub const CONSUMPTION_ESCALATION: Duration = Duration::from_secs(2);

/// What to do about a guest access to a poisoned page, in GHES mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumptionAction {
    /// First access: report it through GHES.
    Report,
    /// The access is being retried while the guest handles the report: let
    /// the guest run.
    Wait,
    /// The guest did not isolate the page in time, or touched it again
    /// later: report the access as a machine check, as the hardware would.
    Escalate,
}

/// Most poisoned pages whose GHES report is tracked.
const MAX_TRACKED: usize = ras::ledger::MAX_PAGES;

/// The error sources of one VM.
pub struct Ghes {
    memory: GuestMemoryMmap,
    sources: Vec<ErrorSource>,
    /// Signals the GSIV source's interrupt (an irqfd on the machine's GHES
    /// interrupt).
    gsiv: Option<EventFd>,
    /// Poisoned pages reported through GHES on access: when first reported.
    reported: BTreeMap<u64, Instant>,
}

/// What a report did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The source.
    pub source: Notification,
    /// Written now or queued.
    pub submitted: Submitted,
    /// What the record says.
    pub summary: cper::RecordSummary,
}

impl Ghes {
    /// Initialises the sources laid out in `layouts`.
    pub fn new(memory: GuestMemoryMmap, layouts: &[SourceLayout]) -> Result<Self, Error> {
        let m = Memory(&memory);
        let sources = layouts
            .iter()
            .map(|l| ErrorSource::new(*l, &m))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            memory,
            sources,
            gsiv: None,
            reported: BTreeMap::new(),
        })
    }

    /// Uses `irq` (an irqfd on the machine's GHES interrupt) to notify the
    /// GSIV source.
    pub fn set_gsiv_irq(&mut self, irq: EventFd) {
        self.gsiv = Some(irq);
    }

    /// Raises the GSIV source's interrupt.
    pub fn notify_gsiv(&self) {
        if let Some(irq) = &self.gsiv {
            let _ = irq.write(1);
        }
    }

    /// Decides what a guest access to the poisoned `page` at `now` gets.
    pub fn on_consumption(&mut self, page: u64, now: Instant) -> ConsumptionAction {
        match self.reported.get(&page) {
            None if self.reported.len() >= MAX_TRACKED => ConsumptionAction::Escalate,
            None => {
                self.reported.insert(page, now);
                ConsumptionAction::Report
            }
            Some(first) if now.duration_since(*first) >= CONSUMPTION_ESCALATION => {
                ConsumptionAction::Escalate
            }
            Some(_) => ConsumptionAction::Wait,
        }
    }

    fn source(&mut self, n: Notification) -> Result<&mut ErrorSource, Error> {
        self.sources
            .iter_mut()
            .find(|s| s.layout.notify == n)
            .ok_or(Error::NoSources)
    }

    /// Reports a memory error at `gpa` with `severity` through `source`.
    pub fn memory_error(
        &mut self,
        source: Notification,
        severity: Severity,
        gpa: u64,
        threshold_exceeded: bool,
    ) -> Result<Report, Error> {
        let record = MemoryErrorRecord {
            severity,
            physical_addr: gpa,
            threshold_exceeded,
        }
        .encode();
        self.raw(source, record)
    }

    /// Reports a memory error through `source` only if its block is free
    /// now (the previous record acknowledged, none queued): a synchronous
    /// report (an SEA) cannot wait in a queue for its record. `None` while
    /// the block is busy.
    pub fn memory_error_now(
        &mut self,
        source: Notification,
        severity: Severity,
        gpa: u64,
    ) -> Result<Option<Report>, Error> {
        let memory = self.memory.clone();
        let s = self.source(source)?;
        s.note_ack(&Memory(&memory))?;
        if s.outstanding() || s.waiting() {
            return Ok(None);
        }
        self.memory_error(source, severity, gpa, false).map(Some)
    }

    /// Reports a raw record, validated first: nothing reaches guest memory
    /// unless it passes.
    pub fn raw(&mut self, source: Notification, record: Vec<u8>) -> Result<Report, Error> {
        let summary = cper::validate(&record)?;
        let memory = self.memory.clone();
        let submitted = self.source(source)?.submit(record, &Memory(&memory))?;
        Ok(Report {
            source,
            submitted,
            summary,
        })
    }

    /// Writes queued records whose predecessors were acknowledged; returns
    /// the sources that now need a notification.
    pub fn pump(&mut self) -> Vec<Notification> {
        let m = Memory(&self.memory);
        self.sources
            .iter_mut()
            .filter(|s| s.waiting())
            .filter_map(|s| matches!(s.pump(&m), Ok(true)).then_some(s.layout.notify))
            .collect()
    }

    /// Whether any source has records waiting.
    pub fn waiting(&self) -> bool {
        self.sources.iter().any(ErrorSource::waiting)
    }

    /// Per-source counters, for the state request and the report.
    pub fn stats(&mut self) -> Vec<SourceState> {
        let m = Memory(&self.memory);
        self.sources
            .iter_mut()
            .map(|s| {
                // An acknowledgement the pump has not seen yet still counts
                // (noted only: queued records are written by the pump, which
                // also notifies).
                let _ = s.note_ack(&m);
                SourceState {
                    source: s.layout.notify,
                    stats: s.stats(),
                    waiting: s.queued(),
                    unacknowledged: s.outstanding(),
                }
            })
            .collect()
    }
}

/// One source's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    /// The source.
    pub source: Notification,
    /// Counters.
    #[serde(flatten)]
    pub stats: hest::SourceStats,
    /// Records waiting for an acknowledgement now (`queued`, from the
    /// counters, is how many ever had to wait; one JSON object holds both,
    /// so the names differ).
    pub waiting: usize,
    /// A written record not acknowledged yet.
    pub unacknowledged: bool,
}

/// The physical address in a line of the guest's CPER decode
/// (drivers/firmware/efi/cper.c prints
/// `{N}[Hardware Error]:   physical_address: 0x%016llx`).
pub fn decoded_address(line: &str) -> Option<u64> {
    if !line.contains("[Hardware Error]") {
        return None;
    }
    let hex = line.split("physical_address: 0x").nth(1)?;
    let hex: String = hex.chars().take_while(char::is_ascii_hexdigit).collect();
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(&hex, 16).ok()
}

/// Parses hex bytes (whitespace allowed between pairs), at most `max` bytes.
pub fn parse_hex(s: &str, max: usize) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err("hex record has an odd number of digits".into());
    }
    if digits.len() / 2 > max {
        return Err(format!(
            "record is {} bytes; at most {max}",
            digits.len() / 2
        ));
    }
    // Hex digits only: from_str_radix alone would take a sign ("+1").
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err("record is not hex".into());
    }
    digits
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "record is not hex".to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_address_from_linux_lines() {
        assert_eq!(
            decoded_address(
                "[    5.1] {1}[Hardware Error]:   physical_address: 0x0000000002345000"
            ),
            Some(0x234_5000)
        );
        assert_eq!(
            decoded_address("{2}[Hardware Error]:  physical_address_mask: 0xfffffffffffff000"),
            None
        );
        assert_eq!(decoded_address("physical_address: 0x1000"), None);
        assert_eq!(
            decoded_address("{1}[Hardware Error]: physical_address: 0x11112222333344445"),
            None
        );
    }

    #[test]
    fn hex_records() {
        assert_eq!(parse_hex("00 ff\n1a", 8), Ok(vec![0, 0xff, 0x1a]));
        assert!(parse_hex("abc", 8).is_err());
        assert!(parse_hex("zz", 8).is_err());
        assert!(parse_hex("0000", 1).is_err());
        assert!(parse_hex("+1+1", 8).is_err(), "no signs");
    }

    fn guest() -> (GuestMemoryMmap, Vec<SourceLayout>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (layouts, _) = hest::layout(0xf_0000, 5);
        (mem, layouts)
    }

    #[test]
    fn records_reach_guest_memory_under_read_ack() {
        let (mem, layouts) = guest();
        let mut g = Ghes::new(mem.clone(), &layouts).unwrap();
        let nmi = layouts[0];
        let r = g
            .memory_error(Notification::Nmi, Severity::Recoverable, 0x5000, false)
            .unwrap();
        assert_eq!(r.submitted, Submitted::Written);
        assert_eq!(r.summary.sections[0].physical_addr, Some(0x5000));
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(nmi.status_address))
                .unwrap(),
            nmi.block
        );
        assert_eq!(mem.read_obj::<u32>(GuestAddress(nmi.block)).unwrap(), 0x11);
        let r = g
            .memory_error(Notification::Nmi, Severity::Corrected, 0x6000, true)
            .unwrap();
        assert_eq!(r.submitted, Submitted::Queued(1));
        assert!(g.waiting());
        assert!(g.pump().is_empty());
        // The guest acknowledges: block_status cleared, ack bit set.
        mem.write_obj(0u32, GuestAddress(nmi.block)).unwrap();
        mem.write_obj(1u64, GuestAddress(nmi.read_ack)).unwrap();
        assert_eq!(g.pump(), vec![Notification::Nmi]);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(nmi.block)).unwrap(), 0x12);
        assert!(!g.waiting());
    }

    #[test]
    fn consumption_is_reported_once_then_escalated() {
        let (mem, layouts) = guest();
        let mut g = Ghes::new(mem, &layouts).unwrap();
        let t0 = Instant::now();
        assert_eq!(g.on_consumption(0x5000, t0), ConsumptionAction::Report);
        assert_eq!(
            g.on_consumption(0x5000, t0 + Duration::from_millis(5)),
            ConsumptionAction::Wait
        );
        assert_eq!(g.on_consumption(0x6000, t0), ConsumptionAction::Report);
        assert_eq!(
            g.on_consumption(0x5000, t0 + CONSUMPTION_ESCALATION),
            ConsumptionAction::Escalate
        );
    }

    #[test]
    fn invalid_raw_records_write_nothing() {
        let (mem, layouts) = guest();
        let mut g = Ghes::new(mem.clone(), &layouts).unwrap();
        let gsiv = layouts[1];
        let before: Vec<u8> = (0..64)
            .map(|i| mem.read_obj::<u8>(GuestAddress(gsiv.block + i)).unwrap())
            .collect();
        let mut rec = MemoryErrorRecord {
            severity: Severity::Recoverable,
            physical_addr: 0x5000,
            threshold_exceeded: false,
        }
        .encode();
        rec.truncate(100);
        assert!(matches!(
            g.raw(Notification::Gsiv, rec),
            Err(Error::Record(_))
        ));
        let after: Vec<u8> = (0..64)
            .map(|i| mem.read_obj::<u8>(GuestAddress(gsiv.block + i)).unwrap())
            .collect();
        assert_eq!(before, after);
        assert_eq!(g.stats()[1].stats.written, 0);
    }
}
