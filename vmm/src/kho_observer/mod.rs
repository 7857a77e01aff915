//! The KHO observer: which pages the guest itself believes are poisoned,
//! read from outside through the KHO root FDT its running kernel published.
//!
//! Which root is the kernel's is decided once per boot, at the agent's
//! hello ([`pin`]: the new root with the next kexec count); an observation
//! reads that pinned root directly and its `hwpoison` blob ([`ras::kho`],
//! ABI v2), re-reading a copy that was torn by an update, a bounded number
//! of times. Every other page of guest RAM that starts with the FDT magic
//! is a candidate a hostile guest could have forged or an earlier kernel
//! left behind: all of guest RAM is scanned, every candidate is counted,
//! and each is reported as rejected with its reason (the first
//! [`MAX_REJECTED`] in detail, KHO roots first). The list is compared with
//! rasvmm's ledger; an incomplete list, or a PFN that cannot be placed in
//! guest RAM, is never reported as agreeing. Every read is bounded by the
//! sizes in [`ras::kho`]; nothing the guest writes can make rasvmm loop or
//! allocate without bound (a scan keeps at most one small record per guest
//! page). Sticky-poisoned pages are never read: their backing is
//! hwpoisoned, and any access, rasvmm's included, would fault.

use std::collections::BTreeSet;
use std::time::Instant;

use ras::kho::{Entry, EntryProblem, KhoRoot, RejectedEntry};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

pub mod corrupt;
pub mod pin;
mod scan;

pub use pin::{Handoff, KhoTracker, Pin};

/// Most rejected candidates listed in detail in a view (all are counted).
pub const MAX_REJECTED: usize = 32;

/// The guest's poison set as its KHO state says, compared with the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KhoView {
    /// Guest-physical address of the running kernel's root, if pinned.
    pub root: Option<u64>,
    /// Its kexec count (1 on the boot rasvmm started).
    pub kexec_count: Option<u32>,
    /// How the root was pinned at the last agent hello.
    pub pin: Pin,
    /// Pages in guest RAM that hold a KHO root, the pinned one included.
    pub roots_found: u32,
    /// Pages that start with the FDT magic, the pinned root included.
    pub candidates: u32,
    /// Candidates other than the pinned root: every one is rejected.
    pub rejected_total: u32,
    /// The first [`MAX_REJECTED`] of them (KHO roots first), with reasons.
    pub rejected: Vec<Rejected>,
    /// The hwpoison subtree: its entries, or why it could not be read.
    pub hwpoison: Hwpoison,
    /// How the guest's set compares with rasvmm's ledger.
    pub comparison: Comparison,
    /// Bytes of guest RAM scanned.
    pub scanned_bytes: u64,
    /// Microseconds the observation took.
    pub scan_us: u64,
}

/// A candidate root that was not taken, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Its guest-physical address.
    pub root: u64,
    /// Its kexec count, if its metadata parsed.
    pub kexec_count: Option<u32>,
    /// Why not.
    pub reason: String,
}

/// The hwpoison subtree's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Hwpoison {
    /// The pinned root has no hwpoison subtree (an unpatched guest kernel),
    /// or guest RAM holds no KHO root (kho=off).
    Absent,
    /// The list, validated (complete or not: see `incomplete`).
    Valid {
        /// Valid entries, sorted by PFN, each PFN once, with their type.
        entries: Vec<Entry>,
        /// The INCOMPLETE flag: some kernel in the chain knew of poisoned
        /// pages the list lacks.
        incomplete: bool,
        /// The blob's version field (major << 8 | minor).
        version: u16,
        /// Its flags field.
        flags: u16,
        /// Entries dropped as duplicates.
        duplicates: u32,
        /// Entries dropped (invalid type, wrapping address, outside guest
        /// RAM, duplicate), each with its problem.
        rejected: Vec<RejectedEntry>,
        /// The blob's update sequence number.
        seq: u64,
    },
    /// The subtree or its blob is malformed (a hostile or broken guest).
    Invalid {
        /// Why.
        reason: String,
    },
    /// No root is pinned (no hello yet, or the pin was ambiguous or failed):
    /// rasvmm does not guess which root is the kernel's.
    Unpinned {
        /// Why.
        reason: String,
    },
}

/// At most this many PFNs or addresses in a one-line summary.
const BRIEF_ITEMS: usize = 6;

/// `v` as `[a, b, ...] (n)`, at most [`BRIEF_ITEMS`] shown, in hex.
pub(crate) fn brief_list(v: &[u64]) -> String {
    let shown: Vec<String> = v
        .iter()
        .take(BRIEF_ITEMS)
        .map(|x| format!("{x:#x}"))
        .collect();
    match v.len() {
        n if n > BRIEF_ITEMS => format!("[{}, ...] ({n})", shown.join(", ")),
        _ => format!("[{}]", shown.join(", ")),
    }
}

impl Hwpoison {
    /// One bounded line for a verdict message (a list can hold thousands).
    pub fn brief(&self) -> String {
        match self {
            Hwpoison::Valid {
                entries,
                incomplete,
                rejected,
                ..
            } => {
                let pfns: Vec<u64> = entries.iter().map(|e| e.pfn).collect();
                format!(
                    "valid, {} entries {}{}, {} rejected",
                    entries.len(),
                    brief_list(&pfns),
                    if *incomplete { ", incomplete" } else { "" },
                    rejected.len()
                )
            }
            other => format!("{other:?}"),
        }
    }

    /// The valid PFNs, if the list is valid.
    pub fn pfns(&self) -> Option<Vec<u64>> {
        match self {
            Hwpoison::Valid { entries, .. } => Some(entries.iter().map(|e| e.pfn).collect()),
            _ => None,
        }
    }
}

/// The guest's poison set against the ledger's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "verdict")]
pub enum Comparison {
    /// The same pages, the list complete, every entry placed.
    Agree,
    /// They differ, or some entry cannot be placed in guest RAM.
    Differ {
        /// Poisoned in the ledger, not known to the guest.
        guest_missing: Vec<u64>,
        /// Known to the guest, not in the ledger.
        guest_extra: Vec<u64>,
        /// PFNs listed that are no guest page (the address wraps, or lies
        /// outside guest RAM).
        #[serde(default)]
        unplaceable: Vec<u64>,
    },
    /// The list says it is incomplete: never agreement, whatever it holds.
    Incomplete {
        /// Poisoned in the ledger, not known to the guest.
        guest_missing: Vec<u64>,
        /// Known to the guest, not in the ledger.
        guest_extra: Vec<u64>,
        /// PFNs listed that are no guest page.
        #[serde(default)]
        unplaceable: Vec<u64>,
    },
    /// No valid guest list to compare.
    Unknown,
}

impl Comparison {
    /// One bounded line for a verdict message.
    pub fn brief(&self) -> String {
        let fields = |kind: &str, m: &[u64], e: &[u64], u: &[u64]| {
            format!(
                "{kind}: guest missing {}, guest extra {}, unplaceable {}",
                brief_list(m),
                brief_list(e),
                brief_list(u)
            )
        };
        match self {
            Comparison::Agree => "agree".into(),
            Comparison::Unknown => "unknown".into(),
            Comparison::Differ {
                guest_missing,
                guest_extra,
                unplaceable,
            } => fields("differ", guest_missing, guest_extra, unplaceable),
            Comparison::Incomplete {
                guest_missing,
                guest_extra,
                unplaceable,
            } => fields("incomplete", guest_missing, guest_extra, unplaceable),
        }
    }
}

/// Compares the guest's list with the ledger's pages (guest-physical
/// addresses). No entry is dropped unseen: one whose address cannot be
/// formed, or that was rejected as outside guest RAM or wrapping, is listed
/// as unplaceable.
pub fn compare(
    entries: &[Entry],
    rejected: &[RejectedEntry],
    incomplete: bool,
    ledger: &[u64],
) -> Comparison {
    let mut unplaceable: Vec<u64> = rejected
        .iter()
        .filter(|r| {
            matches!(
                r.problem,
                EntryProblem::AddressWraps | EntryProblem::OutsideRam
            )
        })
        .map(|r| r.pfn)
        .collect();
    let mut guest = BTreeSet::new();
    for e in entries {
        match e.pfn.checked_mul(4096) {
            Some(a) => {
                guest.insert(a);
            }
            None => unplaceable.push(e.pfn),
        }
    }
    unplaceable.sort_unstable();
    unplaceable.dedup();
    let ours: BTreeSet<u64> = ledger.iter().copied().collect();
    let guest_missing: Vec<u64> = ours.difference(&guest).copied().collect();
    let guest_extra: Vec<u64> = guest.difference(&ours).copied().collect();
    if incomplete {
        Comparison::Incomplete {
            guest_missing,
            guest_extra,
            unplaceable,
        }
    } else if guest_missing.is_empty() && guest_extra.is_empty() && unplaceable.is_empty() {
        Comparison::Agree
    } else {
        Comparison::Differ {
            guest_missing,
            guest_extra,
            unplaceable,
        }
    }
}

/// Why no root is pinned, in words.
fn unpinned(pin: &Pin) -> String {
    match pin {
        Pin::NotYet => "no agent hello yet: no root pinned".into(),
        Pin::NoRoot => "no KHO root in guest RAM at the last hello".into(),
        Pin::Pinned { root, .. } => format!("pinned at {root:#x}"),
        Pin::Ambiguous {
            expected_count,
            qualifying,
            candidates,
        } => format!(
            "pin ambiguous: {qualifying} new roots with kexec count {expected_count} at the \
             last hello (a process ran before the agent?): {candidates:#x?}"
        ),
        Pin::Failed { reason, .. } => format!("pin failed: {reason}"),
    }
}

/// Why a KHO root other than the pinned one is rejected.
fn why_rejected(tracker: &KhoTracker, gpa: u64, own: Option<&str>) -> String {
    let who = if tracker.is_earlier(gpa) {
        "an earlier kernel's root (handed over at a kexec)"
    } else {
        "forged or stale"
    };
    let mut reason = match tracker.pin() {
        Pin::Pinned { root, .. } => format!(
            "{who}: not the root the running kernel published (pinned at hello at {root:#x})"
        ),
        p => format!("{who}: {}", unpinned(p)),
    };
    if let Some(own) = own {
        reason.push_str("; ");
        reason.push_str(own);
    }
    reason
}

/// Reads the pinned root: its kexec count (which must not have changed)
/// and its hwpoison list.
fn read_pinned(
    memory: &GuestMemoryMmap,
    sticky: &BTreeSet<u64>,
    root: u64,
    count: u32,
) -> Hwpoison {
    let parsed = scan::read_page(memory, sticky, root)
        .ok_or_else(|| "not readable (or poisoned)".to_string())
        .and_then(|p| ras::kho::parse_root(&p).map_err(|e| e.to_string()));
    let r = match parsed {
        Ok(r) => r,
        Err(e) => {
            return Hwpoison::Invalid {
                reason: format!("the pinned root at {root:#x} is no KHO root now: {e}"),
            }
        }
    };
    match scan::kexec_count(memory, sticky, &r) {
        Ok(n) if n == count => scan::hwpoison(memory, sticky, &r),
        Ok(n) => Hwpoison::Invalid {
            reason: format!("the pinned root's kexec count changed from {count} to {n}"),
        },
        Err(e) => Hwpoison::Invalid {
            reason: format!("the pinned root lost its kexec-metadata: {e}"),
        },
    }
}

/// Observes guest RAM: the pinned root's list compared with `ledger` (the
/// ledger's page addresses), every other candidate rejected; never reads
/// the `sticky` pages.
pub fn observe(
    memory: &GuestMemoryMmap,
    ledger: &[u64],
    sticky: &BTreeSet<u64>,
    tracker: &KhoTracker,
) -> KhoView {
    let t = Instant::now();
    let pinned = match tracker.pin() {
        Pin::Pinned {
            root, kexec_count, ..
        } => Some((*root, *kexec_count)),
        _ => None,
    };
    // The pinned root's own subtree blobs that are FDTs themselves
    // (memblock's, LUO's) are candidates too: say what they are.
    let subtree_blobs: Vec<(u64, String)> = pinned
        .and_then(|(root, _)| scan::read_page(memory, sticky, root))
        .and_then(|p| ras::kho::parse_root(&p).ok())
        .map(|r| r.subtrees.into_iter().map(|s| (s.blob, s.name)).collect())
        .unwrap_or_default();
    let (mut candidates, mut roots_found, mut rejected_total) = (0u32, 0u32, 0u32);
    let mut kho_roots: Vec<(u64, KhoRoot)> = Vec::new();
    let mut others: Vec<Rejected> = Vec::new();
    let scanned_bytes = scan::each_fdt_page(memory, sticky, |gpa, page| {
        candidates = candidates.saturating_add(1);
        let root = ras::kho::parse_root(page);
        if root.is_ok() {
            roots_found = roots_found.saturating_add(1);
        }
        if pinned.is_some_and(|(p, _)| p == gpa) {
            return;
        }
        rejected_total = rejected_total.saturating_add(1);
        match root {
            Ok(r) if kho_roots.len() < MAX_REJECTED => kho_roots.push((gpa, r)),
            Ok(_) => {}
            Err(e) if others.len() < MAX_REJECTED => others.push(Rejected {
                root: gpa,
                kexec_count: None,
                reason: match subtree_blobs.iter().find(|(b, _)| *b == gpa) {
                    Some((_, name)) => {
                        format!("the running kernel's '{name}' subtree blob, not a root ({e})")
                    }
                    None => e.to_string(),
                },
            }),
            Err(_) => {}
        }
    });
    let mut rejected: Vec<Rejected> = kho_roots
        .iter()
        .map(|(gpa, r)| {
            let count = scan::kexec_count(memory, sticky, r);
            let own = match (&count, scan::hwpoison(memory, sticky, r)) {
                (Err(e), _) => Some(e.clone()),
                (_, Hwpoison::Invalid { reason }) => Some(reason),
                _ => None,
            };
            Rejected {
                root: *gpa,
                kexec_count: count.ok(),
                reason: why_rejected(tracker, *gpa, own.as_deref()),
            }
        })
        .collect();
    rejected.extend(others);
    rejected.truncate(MAX_REJECTED);
    let hwpoison = match (pinned, tracker.pin()) {
        (Some((root, count)), _) => read_pinned(memory, sticky, root, count),
        (None, Pin::NoRoot) => Hwpoison::Absent,
        (None, p) => Hwpoison::Unpinned {
            reason: unpinned(p),
        },
    };
    let comparison = match &hwpoison {
        Hwpoison::Valid {
            entries,
            incomplete,
            rejected,
            ..
        } => compare(entries, rejected, *incomplete, ledger),
        _ => Comparison::Unknown,
    };
    KhoView {
        root: pinned.map(|(r, _)| r),
        kexec_count: pinned.map(|(_, c)| c),
        pin: tracker.pin().clone(),
        roots_found,
        candidates,
        rejected_total,
        rejected,
        hwpoison,
        comparison,
        scanned_bytes,
        scan_us: u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests;
