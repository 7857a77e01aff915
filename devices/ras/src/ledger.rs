//! The poison ledger: which guest pages are bad, and what happened to them.
//!
//! A page is in the ledger when rasvmm made it bad (sticky poison), the host
//! reported it bad, or rasvmm reported it bad to the guest (a machine check
//! or a GHES record naming it) without making it sticky: the ledger is the
//! set of pages the guest has been given reason to believe are bad, which is
//! what the guest's own list (read through KHO) is compared with.
//!
//! Each entry says where the page's badness came from ([`Source`]) and what
//! the guest was told about it ([`Told`]), so a lab can tell a host fault
//! from an injected one and see which report reached the guest.
//!
//! Like DRAM, a poisoned page stays bad: the ledger only grows (up to
//! [`MAX_PAGES`]) and counts every consumption, so a test can tell "the guest
//! never touched it again" from "the guest touched it and was told".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cper::Severity;
use crate::ghes::Notification;
use crate::mce::MemoryError;

// What a guest reset does to the ledger (its own file: ledger/reset.rs).
mod reset;
pub use reset::{Fate, PageFate};

/// Page size the ledger tracks.
pub const PAGE_SIZE: u64 = 4096;
/// Most pages one VM's ledger holds.
pub const MAX_PAGES: usize = 65536;

/// Most distinct reports one entry remembers.
pub const MAX_TOLD: usize = 8;

/// How a page came to be poisoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Poisoned by a request (the `poison` step or API call): rasvmm
    /// hwpoisoned the page's backing memory.
    Injected,
    /// The host's memory under the page failed: the host kernel reported it
    /// (BUS_MCEERR_AO to rasvmm, or BUS_MCEERR_AR to a vCPU whose access
    /// hit it) without rasvmm having asked for it.
    Host,
    /// Reported to the guest (machine check, GHES record) but not made
    /// sticky: the page still works.
    Reported,
    /// Poisoned by the guest itself at rasvmm's request (hwpoison-inject):
    /// not sticky, the guest may unpoison it.
    Guest,
    /// Made bad at the guest's own request through ACPI EINJ (memory
    /// uncorrectable): rasvmm hwpoisoned the page's backing memory, as for
    /// `Injected`.
    GuestEinj,
}

impl Source {
    /// Whether accesses to the page fault (the backing page is poisoned).
    pub fn is_sticky(self) -> bool {
        matches!(self, Source::Injected | Source::Host | Source::GuestEinj)
    }
}

/// What the guest was told about a page: the report, as the guest's
/// handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Told {
    /// An x86 machine check of this class (SRAR, SRAO, UCNA; AMD's deferred
    /// error for SRAO).
    MachineCheck(MemoryError),
    /// An x86 machine check a CPU without SER_P raises (PCC set): the guest
    /// cannot recover.
    Unrecoverable,
    /// An arm64 synchronous external abort.
    Sea,
    /// A CPER memory-error record through a GHES error source.
    Ghes {
        /// The error source.
        source: Notification,
        /// The record's severity.
        severity: Severity,
    },
}

impl Told {
    /// A short name: `srar`, `srao`, `ucna`, `unrecoverable`, `sea`, or
    /// `ghes-<source>-<severity>` (`ghes-gsiv-recoverable`).
    pub fn name(self) -> String {
        match self {
            Told::MachineCheck(e) => e.as_str().to_string(),
            Told::Unrecoverable => "unrecoverable".to_string(),
            Told::Sea => "sea".to_string(),
            Told::Ghes { source, severity } => {
                format!("ghes-{}-{}", source.as_str(), severity.as_str())
            }
        }
    }
}

/// One poisoned page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// How it was poisoned.
    pub source: Source,
    /// Milliseconds from VMM start when it was poisoned.
    pub poisoned_at_ms: u64,
    /// Guest accesses that consumed it (each raised a synchronous error).
    pub consumptions: u32,
    /// Each distinct report the guest was given about it, in order (at most
    /// [`MAX_TOLD`]); empty if the guest has not been told.
    #[serde(default)]
    pub told: Vec<Told>,
}

/// Ledger errors.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// The ledger is full.
    #[error("Poison ledger is full ({MAX_PAGES} pages)")]
    Full,
}

/// The set of poisoned guest pages.
#[derive(Debug, Default)]
pub struct Ledger {
    pages: BTreeMap<u64, Entry>,
}

/// The page containing `gpa`.
pub fn page_of(gpa: u64) -> u64 {
    gpa & !(PAGE_SIZE - 1)
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the page containing `gpa`; returns false if it was already
    /// there with the same stickiness. A reported page made sticky takes the
    /// new source.
    pub fn poison(&mut self, gpa: u64, source: Source, now_ms: u64) -> Result<bool, Error> {
        let page = page_of(gpa);
        if let Some(e) = self.pages.get_mut(&page) {
            if !e.source.is_sticky() && source.is_sticky() {
                e.source = source;
                return Ok(true);
            }
            return Ok(false);
        }
        if self.pages.len() >= MAX_PAGES {
            return Err(Error::Full);
        }
        self.pages.insert(
            page,
            Entry {
                gpa: page,
                source,
                poisoned_at_ms: now_ms,
                consumptions: 0,
                told: Vec::new(),
            },
        );
        Ok(true)
    }

    /// Whether the page containing `gpa` is in the ledger.
    pub fn contains(&self, gpa: u64) -> bool {
        self.pages.contains_key(&page_of(gpa))
    }

    /// Whether the page containing `gpa` can be entered: it is in the
    /// ledger already, or the ledger is not full.
    pub fn has_room_for(&self, gpa: u64) -> bool {
        self.contains(gpa) || self.pages.len() < MAX_PAGES
    }

    /// Pages that came from `source`.
    pub fn count(&self, source: Source) -> usize {
        self.pages.values().filter(|e| e.source == source).count()
    }

    /// Whether the page containing `gpa` is sticky-poisoned.
    pub fn is_sticky(&self, gpa: u64) -> bool {
        self.pages
            .get(&page_of(gpa))
            .is_some_and(|e| e.source.is_sticky())
    }

    /// Counts a consumption of the page containing `gpa`; a page not yet in
    /// the ledger (host poison rasvmm did not cause) is added as [`Source::Host`].
    pub fn consume(&mut self, gpa: u64, now_ms: u64) -> Result<u32, Error> {
        self.poison(gpa, Source::Host, now_ms)?;
        let e = self.pages.get_mut(&page_of(gpa)).ok_or(Error::Full)?;
        e.consumptions = e.consumptions.saturating_add(1);
        Ok(e.consumptions)
    }

    /// Notes that the guest was told `told` about the page containing
    /// `gpa`, if the ledger holds it (a report repeated is noted once).
    pub fn tell(&mut self, gpa: u64, told: Told) {
        if let Some(e) = self.pages.get_mut(&page_of(gpa)) {
            if !e.told.contains(&told) && e.told.len() < MAX_TOLD {
                e.told.push(told);
            }
        }
    }

    /// The entry for the page containing `gpa`.
    pub fn get(&self, gpa: u64) -> Option<&Entry> {
        self.pages.get(&page_of(gpa))
    }

    /// All entries by address.
    pub fn entries(&self) -> Vec<Entry> {
        self.pages.values().cloned().collect()
    }

    /// Removes the page containing `gpa` if it is not sticky (the guest
    /// unpoisoned a page it had been told of, or poisoned itself); returns
    /// whether it was removed. Sticky pages stay: the memory is still bad.
    pub fn forget(&mut self, gpa: u64) -> bool {
        let page = page_of(gpa);
        match self.pages.get(&page) {
            Some(e) if !e.source.is_sticky() => self.pages.remove(&page).is_some(),
            _ => false,
        }
    }

    /// Number of poisoned pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether no page is poisoned.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_is_per_page_and_idempotent() {
        let mut l = Ledger::new();
        assert_eq!(l.poison(0x1234, Source::Injected, 5), Ok(true));
        assert_eq!(l.poison(0x1ff8, Source::Injected, 6), Ok(false));
        assert!(l.contains(0x1000) && !l.contains(0x2000));
        assert_eq!(l.entries()[0].gpa, 0x1000);
        assert_eq!(l.entries()[0].poisoned_at_ms, 5);
    }

    #[test]
    fn consumptions_count_and_host_pages_join() {
        let mut l = Ledger::new();
        l.poison(0x5000, Source::Injected, 0).unwrap();
        assert_eq!(l.consume(0x5008, 1), Ok(1));
        assert_eq!(l.consume(0x5010, 2), Ok(2));
        assert_eq!(l.consume(0x9000, 3), Ok(1));
        let e = l.entries();
        assert_eq!((e[0].source, e[0].consumptions), (Source::Injected, 2));
        assert_eq!((e[1].source, e[1].consumptions), (Source::Host, 1));
    }

    #[test]
    fn reported_pages_become_sticky_when_poisoned() {
        let mut l = Ledger::new();
        assert_eq!(l.poison(0x3000, Source::Reported, 1), Ok(true));
        assert!(l.contains(0x3000) && !l.is_sticky(0x3000));
        assert_eq!(l.poison(0x3000, Source::Reported, 2), Ok(false));
        assert_eq!(l.poison(0x3000, Source::Injected, 3), Ok(true));
        assert!(l.is_sticky(0x3000));
        assert_eq!(l.poison(0x3000, Source::Reported, 4), Ok(false));
        assert_eq!(l.entries()[0].source, Source::Injected);
    }

    #[test]
    fn told_is_remembered_once_per_report_and_bounded() {
        let mut l = Ledger::new();
        l.tell(0x7000, Told::Sea);
        assert!(
            l.is_empty(),
            "a page not in the ledger is not added by tell"
        );
        l.poison(0x7000, Source::Host, 0).unwrap();
        l.tell(0x7008, Told::MachineCheck(MemoryError::Srao));
        l.tell(0x7000, Told::MachineCheck(MemoryError::Srao));
        l.tell(0x7000, Told::MachineCheck(MemoryError::Srar));
        let told = &l.get(0x7000).unwrap().told;
        assert_eq!(
            told,
            &[
                Told::MachineCheck(MemoryError::Srao),
                Told::MachineCheck(MemoryError::Srar)
            ]
        );
        for s in [Severity::Recoverable, Severity::Fatal, Severity::Corrected] {
            for n in Notification::ALL {
                l.tell(
                    0x7000,
                    Told::Ghes {
                        source: n,
                        severity: s,
                    },
                );
            }
        }
        assert_eq!(l.get(0x7000).unwrap().told.len(), MAX_TOLD);
        let names: Vec<String> = l.get(0x7000).unwrap().told[..3]
            .iter()
            .map(|t| t.name())
            .collect();
        assert_eq!(names, ["srao", "srar", "ghes-nmi-recoverable"]);
        let json = serde_json::to_string(&l.get(0x7000).unwrap().told[..3]).unwrap();
        assert_eq!(
            json,
            r#"[{"machine-check":"srao"},{"machine-check":"srar"},{"ghes":{"source":"nmi","severity":"recoverable"}}]"#
        );
    }

    #[test]
    fn ledger_is_bounded() {
        let mut l = Ledger::new();
        for i in 0..MAX_PAGES as u64 {
            l.poison(i * PAGE_SIZE, Source::Injected, 0).unwrap();
        }
        assert_eq!(l.poison(1 << 40, Source::Injected, 0), Err(Error::Full));
        assert_eq!(l.consume(1 << 40, 0), Err(Error::Full));
        assert_eq!(l.len(), MAX_PAGES);
    }
}
