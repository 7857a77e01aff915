//! The KHO observer over a whole (small) guest RAM the fuzzer writes: the
//! pin at a hello, an observation, and a `kho-corrupt` of the pinned blob.
//! Whatever the guest wrote, nothing panics, every candidate root is
//! counted, at most `MAX_REJECTED` are detailed, and an incomplete list or
//! an unplaceable PFN never reads as agreement.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use ras::kho::corrupt::{Edit, Place};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::kho_observer::{self, Comparison, Hwpoison, KhoTracker, Pin};

/// Guest RAM: 64 pages.
const RAM: usize = 64 * 4096;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]) else {
        return;
    };
    let (image, tail) = data.split_at(data.len().min(RAM));
    if m.write_slice(image, GuestAddress(0)).is_err() {
        return;
    }
    let ledger: Vec<u64> = tail
        .chunks_exact(8)
        .take(16)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let sticky: BTreeSet<u64> = ledger.iter().map(|a| a & !0xfff).take(2).collect();
    let mut t = KhoTracker::new();
    t.at_hello(&m, &sticky, 0);
    let v = kho_observer::observe(&m, &ledger, &sticky, &t);
    assert!(v.rejected.len() <= kho_observer::MAX_REJECTED);
    let pinned = u32::from(matches!(t.pin(), Pin::Pinned { .. }) && v.root.is_some());
    // Every candidate but the pinned root is rejected, and counted.
    assert!(v.candidates >= v.rejected_total && v.candidates - v.rejected_total <= pinned);
    assert!(v.roots_found <= v.candidates);
    if let Hwpoison::Valid {
        incomplete: true, ..
    } = v.hwpoison
    {
        assert!(matches!(v.comparison, Comparison::Incomplete { .. }));
    }
    if let Comparison::Agree = v.comparison {
        assert!(
            matches!(v.hwpoison, Hwpoison::Valid { incomplete: false, ref rejected, .. }
            if rejected.iter().all(|r| !matches!(r.problem,
                ras::kho::EntryProblem::AddressWraps | ras::kho::EntryProblem::OutsideRam)))
        );
    }
    let edits = [Edit::Wrap, Edit::Duplicate, Edit::MoveTo(Place::LastPage)];
    if kho_observer::corrupt::corrupt(&m, &sticky, &t, &edits).is_ok() {
        let _ = kho_observer::observe(&m, &ledger, &sticky, &t);
    }
    // A kexec: snapshot, then the next hello.
    t.before_kexec(&m, &sticky);
    t.at_hello(&m, &sticky, 1);
    assert!(!matches!(t.pin(), Pin::NotYet));
});
