//! The RAS controller across a guest reset.
//!
//! The ledger belongs to the guest memory and outlives every boot; the
//! vCPUs' request handles, the GHES sources (described by a boot's firmware
//! tables) and the firmware range belong to one boot, and
//! [`RasController::new_boot`] replaces them when the machine is rebuilt.
//!
//! At the reset itself ([`RasController::at_reset`]) each sticky page is
//! either kept bad or, as QEMU does at every system reset
//! (`kvm_unpoison_all` in accel/kvm/kvm-all.c calls `qemu_ram_remap` in
//! system/physmem.c for each page it recorded as hwpoisoned), replaced by
//! a fresh anonymous page mapped `MAP_FIXED` over it: the host frame stays
//! poisoned and out of use, and the guest finds zeroed memory there. The
//! ledger records each page's fate ([`ras::ledger::Fate`]).

use std::ops::Range;

use devices::bus::lock;
use ras::ledger::{self, PageFate};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{RasController, RasError};
use crate::ghes_sources::Ghes;

impl RasController {
    /// A rebuilt machine's boot-bound parts: its GHES sources (written into
    /// its freshly loaded tables) and its firmware range. Its vCPUs come
    /// through [`RasController::set_vcpus`].
    pub fn new_boot(&self, ghes: Option<Ghes>, firmware: Range<u64>) -> Result<(), RasError> {
        match (&self.ghes, ghes) {
            (Some(current), Some(g)) => *lock(current) = g,
            (None, None) => {}
            // The same configuration loads the same tables every boot.
            _ => {
                return Err(RasError::Unsupported(
                    "the rebuilt machine's GHES sources differ from the first boot's",
                ))
            }
        }
        *lock(&self.firmware) = firmware;
        self.reset_arch();
        Ok(())
    }

    /// The guest reset and every vCPU of its boot has stopped: sticky
    /// pages are replaced by fresh zeroed memory unless `keep`, and the
    /// ledger records every page's fate. An error leaves the ledger as it
    /// was (pages remapped before the failure are healthy memory).
    pub fn at_reset(&self, keep: bool) -> Result<Vec<PageFate>, RasError> {
        // Host-poisoned pages no report named are remapped or kept too
        // (and the loader never writes to one unknowingly).
        self.sweep_host_poison();
        let mut ledger = lock(&self.ledger);
        if !keep {
            for e in ledger.entries().iter().filter(|e| e.source.is_sticky()) {
                self.remap(e.gpa)?;
                lock(&self.remapped).insert(e.gpa);
            }
        }
        Ok(ledger.reset(keep))
    }

    /// Maps a fresh anonymous page over the guest page at `gpa`, with the
    /// flags vm-memory gave the whole region (QEMU's qemu_ram_remap does
    /// the same for anonymous RAM).
    fn remap(&self, gpa: u64) -> Result<(), RasError> {
        let page = usize::try_from(ledger::PAGE_SIZE).unwrap_or(4096);
        let hva = self
            .memory
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| RasError::NotRam(gpa))?;
        // SAFETY: `hva` is the start of one page inside rasvmm's own
        // anonymous private guest mapping, which `self.memory` keeps mapped.
        // MAP_FIXED replaces exactly that page. No vCPU runs (the caller
        // joined them all) and rasvmm holds no reference into the page,
        // whose old backing is hwpoisoned and never read.
        let mapped = unsafe {
            libc::mmap(
                hva.cast(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(RasError::Remap {
                gpa,
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
impl RasController {
    /// Records `gpa` as sticky in the ledger without poisoning the host
    /// page: for tests of the reset on hosts without CONFIG_MEMORY_FAILURE.
    pub(crate) fn mark_sticky_for_test(&self, gpa: u64) {
        let _ = lock(&self.ledger).poison(gpa, ledger::Source::Injected, 0);
    }
}
