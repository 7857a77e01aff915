//! What a guest reset does to the ledger.
//!
//! A reset ends the kernel that was told about pages; the memory itself
//! lives on. Per page, by its [`Source`]:
//!
//! - a sticky page (`injected`, `host`, `guest-einj`: its host backing is
//!   hwpoisoned) is either replaced by fresh zeroed memory, as QEMU does at every system
//!   reset (`kvm_unpoison_all` → `qemu_ram_remap`, accel/kvm/kvm-all.c and
//!   system/physmem.c): [`Fate::Remapped`], gone from the ledger; or, when
//!   the DRAM is to stay broken (`--keep-poison-on-reset`), kept bad:
//!   [`Fate::Kept`], still in the ledger, its consumptions counting on;
//! - a page only a kernel believed bad (`reported`, `guest`) describes
//!   that kernel's belief; the next kernel believes nothing, so the entry
//!   leaves the ledger as [`Fate::Forgotten`], recorded with the boot it
//!   belonged to.
//!
//! The ledger stays "what the running kernel has reason to believe, plus the
//! memory that is bad now"; the fates say what happened at each reset.

use serde::{Deserialize, Serialize};

use super::{Ledger, Source};

/// What became of a ledger page when the guest reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fate {
    /// A sticky page replaced by fresh zeroed memory: no longer bad.
    Remapped,
    /// A sticky page left bad: the next access raises a fresh error.
    Kept,
    /// A page only the old kernel believed bad: the new one was told nothing.
    Forgotten,
}

/// One ledger page at a reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageFate {
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// How it had been poisoned.
    pub source: Source,
    /// Consumptions counted up to the reset.
    pub consumptions: u32,
    /// What the reset did with it.
    pub fate: Fate,
    /// What the kernel that reset had been told of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub told: Vec<super::Told>,
}

impl Ledger {
    /// The guest reset: decides every page's [`Fate`] (sticky pages are
    /// kept if `keep_sticky`, else remapped) and removes the pages that are
    /// no longer bad nor believed bad. The caller makes the remapping real.
    pub fn reset(&mut self, keep_sticky: bool) -> Vec<PageFate> {
        let fates: Vec<PageFate> = self
            .pages
            .values()
            .map(|e| PageFate {
                gpa: e.gpa,
                source: e.source,
                consumptions: e.consumptions,
                fate: match (e.source.is_sticky(), keep_sticky) {
                    (true, true) => Fate::Kept,
                    (true, false) => Fate::Remapped,
                    (false, _) => Fate::Forgotten,
                },
                told: e.told.clone(),
            })
            .collect();
        self.pages
            .retain(|_, e| keep_sticky && e.source.is_sticky());
        // The next kernel was told nothing of the pages kept bad.
        for e in self.pages.values_mut() {
            e.told.clear();
        }
        fates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> Ledger {
        let mut l = Ledger::new();
        l.poison(0x1000, Source::Injected, 1).unwrap();
        l.consume(0x1000, 2).unwrap();
        l.consume(0x2000, 3).unwrap(); // host
        l.poison(0x3000, Source::Reported, 4).unwrap();
        l.poison(0x4000, Source::Guest, 5).unwrap();
        l
    }

    #[test]
    fn a_reset_remaps_sticky_pages_and_forgets_beliefs() {
        let mut l = ledger();
        let f = l.reset(false);
        let got: Vec<(u64, Source, u32, Fate)> = f
            .iter()
            .map(|p| (p.gpa, p.source, p.consumptions, p.fate))
            .collect();
        assert_eq!(
            got,
            [
                (0x1000, Source::Injected, 1, Fate::Remapped),
                (0x2000, Source::Host, 1, Fate::Remapped),
                (0x3000, Source::Reported, 0, Fate::Forgotten),
                (0x4000, Source::Guest, 0, Fate::Forgotten),
            ]
        );
        assert!(l.is_empty());
        // A remapped page can be poisoned again, as a new page.
        assert_eq!(l.poison(0x1000, Source::Injected, 9), Ok(true));
        assert_eq!(l.entries()[0].consumptions, 0);
    }

    #[test]
    fn keeping_poison_keeps_sticky_pages_and_their_counts() {
        let mut l = ledger();
        let f = l.reset(true);
        assert_eq!(
            f.iter().map(|p| p.fate).collect::<Vec<_>>(),
            [Fate::Kept, Fate::Kept, Fate::Forgotten, Fate::Forgotten]
        );
        assert_eq!(l.len(), 2);
        assert!(l.is_sticky(0x1000) && l.is_sticky(0x2000));
        assert!(!l.contains(0x3000) && !l.contains(0x4000));
        // The next boot's access counts on.
        assert_eq!(l.consume(0x1000, 10), Ok(2));
        // A second reset finds them again.
        assert_eq!(l.reset(true).len(), 2);
    }

    #[test]
    fn a_kept_page_keeps_nothing_of_what_the_old_kernel_was_told() {
        let mut l = ledger();
        let srar = crate::ledger::Told::MachineCheck(crate::mce::MemoryError::Srar);
        l.tell(0x1000, srar);
        let f = l.reset(true);
        // The boot that reset was told; the next kernel was not.
        assert_eq!(f[0].told, [srar]);
        assert!(l.entries()[0].told.is_empty());
        assert_eq!(l.entries()[0].consumptions, 1);
    }

    #[test]
    fn an_empty_ledger_resets_to_nothing() {
        assert!(Ledger::new().reset(false).is_empty());
    }
}
