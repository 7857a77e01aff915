//! Pinning the running kernel's own KHO root, so that no page a guest
//! process writes can stand in for it.
//!
//! The kernel allocates its root at `fs_initcall`, before any userspace,
//! and never moves it; a guest process can write only its own user pages.
//! So at every agent hello (each boot, including after a kexec) rasvmm
//! scans guest RAM and pins the root that is new (its address and the keyed
//! hash of its bytes and of its kexec-metadata blob are not among the roots
//! present right before the last kexec request) and whose kexec count is the previous pinned count plus
//! one (1 on the boot rasvmm started: the kernel publishes its incoming
//! count plus one, and a cold boot has none). Right before rasvmm asks the
//! agent to kexec, it snapshots the roots present, so stale and forged ones
//! from the old kernel's life are known. Later observations read the pinned
//! root directly. No pick is ever silent: several qualifying roots at a
//! hello (only possible if a hostile process ran before the agent) make the
//! pin `ambiguous`, none make it `failed` (or `no-root` when guest RAM holds
//! no KHO root at all).

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::scan;

/// Most candidate addresses an ambiguous pin lists.
const MAX_LISTED: usize = 16;
/// Most earlier kernels' roots remembered.
const MAX_EARLIER: usize = 64;

/// How the running kernel's root was pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Pin {
    /// No agent hello yet.
    NotYet,
    /// Guest RAM held no KHO root at the hello (kho=off, or no KHO).
    NoRoot,
    /// The running kernel's root.
    Pinned {
        /// Its guest-physical address.
        root: u64,
        /// Its kexec count.
        kexec_count: u32,
        /// Whether the previous kernel's root was still there.
        handoff: Handoff,
    },
    /// Several roots qualified: rasvmm does not pick one.
    Ambiguous {
        /// The kexec count the running kernel must publish.
        expected_count: u32,
        /// How many qualified.
        qualifying: u32,
        /// Some of them.
        candidates: Vec<u64>,
    },
    /// KHO roots were present, none qualified.
    Failed {
        /// The kexec count the running kernel must publish.
        expected_count: u32,
        /// Why.
        reason: String,
    },
}

/// After a kexec, the previous kernel's root (the incoming one) stays
/// reserved in the new kernel: is it still there?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Handoff {
    /// No earlier root was pinned (the boot rasvmm started, or an earlier
    /// pin failed).
    FirstBoot,
    /// The previous root is where it was, with its kexec count.
    Kept {
        /// Its address.
        previous: u64,
    },
    /// It is gone or changed.
    Missing {
        /// Its address.
        previous: u64,
        /// What is there now.
        reason: String,
    },
}

/// The pin across the run: owned by the session.
#[derive(Debug)]
pub struct KhoTracker {
    keys: RandomState,
    pin: Pin,
    /// KHO roots present right before the last kexec request (address,
    /// hash); at most one per guest page.
    before_kexec: BTreeSet<(u64, u64)>,
    /// The pinned root right before the last kexec: address, kexec count.
    handed_over: Option<(u64, u32)>,
    /// Roots earlier kernels of the chain published.
    earlier: Vec<u64>,
}

impl Default for KhoTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl KhoTracker {
    /// Nothing pinned yet.
    pub fn new() -> Self {
        Self {
            keys: RandomState::new(),
            pin: Pin::NotYet,
            before_kexec: BTreeSet::new(),
            handed_over: None,
            earlier: Vec::new(),
        }
    }

    /// The pin.
    pub fn pin(&self) -> &Pin {
        &self.pin
    }

    /// Whether `gpa` is a root an earlier kernel of the chain published.
    pub fn is_earlier(&self, gpa: u64) -> bool {
        self.earlier.contains(&gpa)
    }

    /// The agent said hello (a boot, `kexecs` kexecs into the run): pin
    /// the root the running kernel published.
    pub fn at_hello(&mut self, memory: &GuestMemoryMmap, sticky: &BTreeSet<u64>, kexecs: u32) {
        let expected = match self.handed_over {
            Some((_, c)) => c.wrapping_add(1),
            None => kexecs.wrapping_add(1),
        };
        let (mut roots, mut qualifying) = (0u32, 0u32);
        let mut listed = Vec::new();
        let mut handoff = match self.handed_over {
            None => Handoff::FirstBoot,
            Some((previous, _)) => Handoff::Missing {
                previous,
                reason: "no KHO root there any more".into(),
            },
        };
        let keys = &self.keys;
        let before = &self.before_kexec;
        let handed_over = self.handed_over;
        scan::each_fdt_page(memory, sticky, |gpa, page| {
            let Ok(root) = ras::kho::parse_root(page) else {
                return;
            };
            roots += 1;
            let meta = scan::metadata(memory, sticky, &root);
            let id = scan::identity(keys, page, &root, meta.as_ref().ok().map(|(_, b)| &b[..]));
            let count = meta.map(|(c, _)| c);
            if let Some((previous, c)) = handed_over.filter(|(a, _)| *a == gpa) {
                handoff = match &count {
                    Ok(n) if *n == c => Handoff::Kept { previous },
                    Ok(n) => Handoff::Missing {
                        previous,
                        reason: format!("its kexec count is now {n}, was {c}"),
                    },
                    Err(e) => Handoff::Missing {
                        previous,
                        reason: e.clone(),
                    },
                };
            }
            if count == Ok(expected) && !before.contains(&(gpa, id)) {
                qualifying += 1;
                if listed.len() < MAX_LISTED {
                    listed.push(gpa);
                }
            }
        });
        if let Pin::Pinned { root, .. } = self.pin {
            if self.earlier.len() < MAX_EARLIER && !self.earlier.contains(&root) {
                self.earlier.push(root);
            }
        }
        self.pin = match (qualifying, listed.first()) {
            (1, Some(root)) => Pin::Pinned {
                root: *root,
                kexec_count: expected,
                handoff,
            },
            (0, _) if roots == 0 => Pin::NoRoot,
            (0, _) => Pin::Failed {
                expected_count: expected,
                reason: format!(
                    "none of the {roots} KHO roots in guest RAM is new since the last kexec \
                     with kexec count {expected}"
                ),
            },
            _ => Pin::Ambiguous {
                expected_count: expected,
                qualifying,
                candidates: listed,
            },
        };
    }

    /// rasvmm is about to ask the agent to kexec: remember the roots
    /// present now, and the pinned one.
    pub fn before_kexec(&mut self, memory: &GuestMemoryMmap, sticky: &BTreeSet<u64>) {
        let mut seen = BTreeSet::new();
        let keys = &self.keys;
        scan::each_fdt_page(memory, sticky, |gpa, page| {
            if let Ok(root) = ras::kho::parse_root(page) {
                let meta = scan::metadata(memory, sticky, &root).ok();
                let id = scan::identity(keys, page, &root, meta.as_ref().map(|(_, b)| &b[..]));
                seen.insert((gpa, id));
            }
        });
        self.before_kexec = seen;
        self.handed_over = match self.pin {
            Pin::Pinned {
                root, kexec_count, ..
            } => Some((root, kexec_count)),
            _ => None,
        };
    }
}
