//! The poison ledger: which guest pages are bad, and what happened to them.
//!
//! A page is in the ledger when rasvmm made it bad (sticky poison), the host
//! reported it bad, or rasvmm reported it bad to the guest (a machine check
//! or a GHES record naming it) without making it sticky: the ledger is the
//! set of pages the guest has been given reason to believe are bad, which is
//! what the guest's own list (read through KHO) is compared with.
//!
//! Like DRAM, a poisoned page stays bad: the ledger only grows (up to
//! [`MAX_PAGES`]) and counts every consumption, so a test can tell "the guest
//! never touched it again" from "the guest touched it and was told".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

// What a guest reset does to the ledger (its own file: ledger/reset.rs).
mod reset;
pub use reset::{Fate, PageFate};

/// Page size the ledger tracks.
pub const PAGE_SIZE: u64 = 4096;
/// Most pages one VM's ledger holds.
pub const MAX_PAGES: usize = 65536;

/// How a page came to be poisoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// A `poison` request.
    Injected,
    /// The host reported a memory failure in the page's backing memory.
    Host,
    /// Reported to the guest (machine check, GHES record) but not made
    /// sticky: the page still works.
    Reported,
    /// Poisoned by the guest itself at rasvmm's request (hwpoison-inject):
    /// not sticky, the guest may unpoison it.
    Guest,
}

impl Source {
    /// Whether accesses to the page fault (the backing page is poisoned).
    pub fn is_sticky(self) -> bool {
        matches!(self, Source::Injected | Source::Host)
    }
}

/// One poisoned page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// How it was poisoned.
    pub source: Source,
    /// Milliseconds from VMM start when it was poisoned.
    pub poisoned_at_ms: u64,
    /// Guest accesses that consumed it (each raised a synchronous error).
    pub consumptions: u32,
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
            },
        );
        Ok(true)
    }

    /// Whether the page containing `gpa` is in the ledger.
    pub fn contains(&self, gpa: u64) -> bool {
        self.pages.contains_key(&page_of(gpa))
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

    /// All entries by address.
    pub fn entries(&self) -> Vec<Entry> {
        self.pages.values().copied().collect()
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
