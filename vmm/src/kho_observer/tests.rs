use ras::kho::{build, corrupt::Edit, corrupt::Place, EntryType};
use vm_memory::{Bytes, GuestAddress};

use super::*;

fn guest() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn put(m: &GuestMemoryMmap, gpa: u64, b: &[u8]) {
    m.write_slice(b, GuestAddress(gpa)).unwrap();
}

/// A KHO root at `root` naming a kexec-metadata blob (count `kexecs`)
/// at `meta` and the hwpoison blob `hw` at `hw_at`, all three written.
fn put_kho(m: &GuestMemoryMmap, root: u64, meta: u64, kexecs: u32, hw_at: u64, hw: &[u8]) {
    let subtrees = [
        ("kexec-metadata", meta, 73),
        ("hwpoison", hw_at, hw.len() as u64),
    ];
    put(m, root, &build::kho_root(0, &subtrees));
    put(m, meta, &build::metadata(kexecs));
    put(m, hw_at, hw);
}

/// A tracker that has seen the first hello.
fn pinned(m: &GuestMemoryMmap) -> KhoTracker {
    let mut t = KhoTracker::new();
    t.at_hello(m, &BTreeSet::new(), 0);
    t
}

fn observe_all(m: &GuestMemoryMmap, t: &KhoTracker, ledger: &[u64]) -> KhoView {
    observe(m, ledger, &BTreeSet::new(), t)
}

fn hw_entries(v: &KhoView) -> Vec<(u64, EntryType)> {
    match &v.hwpoison {
        Hwpoison::Valid { entries, .. } => entries.iter().map(|e| (e.pfn, e.kind)).collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sticky_pages_are_never_read() {
    let m = guest();
    let hw = build::hwpoison(2, 4, &[0x50]);
    put_kho(&m, 0x40_0000, 0x41_0000, 1, 0x50_0000, &hw);
    let t = pinned(&m);
    // The blob's page is sticky: reported, not read.
    let v = observe(&m, &[0x50_0000], &BTreeSet::from([0x50_0000]), &t);
    assert!(matches!(v.hwpoison, Hwpoison::Invalid { .. }));
    // The root's page is sticky: not pinned at all.
    let mut t = KhoTracker::new();
    t.at_hello(&m, &BTreeSet::from([0x40_0000]), 0);
    assert_eq!(t.pin(), &Pin::NoRoot);
}

#[test]
fn comparison() {
    let e = |pfns: &[u64]| -> Vec<Entry> {
        pfns.iter()
            .map(|p| Entry {
                pfn: *p,
                kind: EntryType::Hardware,
            })
            .collect()
    };
    assert_eq!(
        compare(&e(&[1, 2]), &[], false, &[0x1000, 0x2000]),
        Comparison::Agree
    );
    assert_eq!(
        compare(&e(&[2, 3]), &[], false, &[0x1000, 0x2000]),
        Comparison::Differ {
            guest_missing: vec![0x1000],
            guest_extra: vec![0x3000],
            unplaceable: vec![]
        }
    );
    // A PFN that cannot be placed is never dropped silently.
    assert_eq!(
        compare(&e(&[0x77, 1 << 52]), &[], false, &[0x77000]),
        Comparison::Differ {
            guest_missing: vec![],
            guest_extra: vec![],
            unplaceable: vec![1 << 52]
        }
    );
    // An incomplete list never agrees.
    assert!(matches!(
        compare(&e(&[1]), &[], true, &[0x1000]),
        Comparison::Incomplete { .. }
    ));
}

#[test]
fn a_wrapping_pfn_in_the_blob_is_not_agreement() {
    let m = guest();
    let raw = [
        build::entry(0x77, EntryType::Hardware),
        build::entry(1 << 52, EntryType::Hardware),
    ];
    let hw = build::hwpoison_raw(kho::HWPOISON_VERSION, 0, 2, 4, &raw);
    put_kho(&m, 0x10_0000, 0x20_0000, 1, 0x30_0000, &hw);
    let v = observe_all(&m, &pinned(&m), &[0x77_000]);
    assert_eq!(
        v.comparison,
        Comparison::Differ {
            guest_missing: vec![],
            guest_extra: vec![],
            unplaceable: vec![1 << 52]
        }
    );
    // Beyond guest RAM, likewise.
    let hw = build::hwpoison(4, 4, &[0x77, 0x10_0000]);
    put(&m, 0x30_0000, &hw);
    let v = observe_all(&m, &pinned(&m), &[0x77_000]);
    match &v.hwpoison {
        Hwpoison::Valid { rejected, .. } => {
            assert_eq!(rejected[0].problem, EntryProblem::OutsideRam);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(v.comparison, Comparison::Differ { ref unplaceable, .. } if unplaceable == &[0x10_0000])
    );
}

#[test]
fn reads_the_pinned_root_and_its_typed_list() {
    let m = guest();
    let raw = [
        build::entry(0x345, EntryType::SoftOffline),
        build::entry(0x123, EntryType::Simulated),
    ];
    let hw = build::hwpoison_raw(kho::HWPOISON_VERSION, 0, 2, 16, &raw);
    put_kho(&m, 0x40_0000, 0x30_0000, 1, 0x50_0000, &hw);
    // Something FDT-like that is not KHO.
    put(
        &m,
        0x60_0000,
        &build::fdt(&[("compatible", b"x\0".to_vec())], &[]),
    );
    let t = pinned(&m);
    // A subtree whose blob is an FDT (memblock's), added after the hello.
    let subtrees = [
        ("kexec-metadata", 0x30_0000, 73),
        ("hwpoison", 0x50_0000, hw.len() as u64),
        ("memblock", 0x70_0000, 64),
    ];
    put(&m, 0x40_0000, &build::kho_root(0, &subtrees));
    let memblock = build::fdt(&[("compatible", b"memblock-v1\0".to_vec())], &[]);
    put(&m, 0x70_0000, &memblock);
    assert!(matches!(
        t.pin(),
        Pin::Pinned {
            root: 0x40_0000,
            kexec_count: 1,
            handoff: Handoff::FirstBoot
        }
    ));
    let v = observe_all(&m, &t, &[0x123_000, 0x345_000]);
    assert_eq!((v.root, v.kexec_count), (Some(0x40_0000), Some(1)));
    assert_eq!((v.roots_found, v.candidates, v.rejected_total), (1, 3, 2));
    assert!(v.rejected[0].reason.contains("not a KHO root"));
    assert!(v.rejected[1].reason.contains("'memblock' subtree blob"));
    assert_eq!(v.scanned_bytes, 16 << 20);
    assert_eq!(
        hw_entries(&v),
        vec![
            (0x123, EntryType::Simulated),
            (0x345, EntryType::SoftOffline)
        ]
    );
    assert_eq!(v.comparison, Comparison::Agree);
    let v = observe_all(&m, &t, &[0x123_000, 0x999_000]);
    assert_eq!(
        v.comparison,
        Comparison::Differ {
            guest_missing: vec![0x999_000],
            guest_extra: vec![0x345_000],
            unplaceable: vec![]
        }
    );
}

#[test]
fn the_incomplete_flag_is_read_not_refused() {
    let m = guest();
    let raw = [build::entry(0x77, EntryType::Hardware)];
    put_kho(
        &m,
        0x10_0000,
        0x20_0000,
        1,
        0x30_0000,
        &build::hwpoison_raw(kho::HWPOISON_VERSION, 1, 2, 4, &raw),
    );
    let v = observe_all(&m, &pinned(&m), &[0x77_000]);
    assert!(matches!(
        v.hwpoison,
        Hwpoison::Valid {
            incomplete: true,
            ..
        }
    ));
    assert!(matches!(v.comparison, Comparison::Incomplete { .. }));
}

#[test]
fn a_forged_newest_root_does_not_win() {
    let m = guest();
    let hw = build::hwpoison(2, 4, &[0x77]);
    put_kho(&m, 0x80_0000, 0x81_0000, 1, 0x82_0000, &hw);
    let t = pinned(&m);
    // Written after the hello: consistent, kexec count u32::MAX, at a
    // lower address than the kernel's.
    put_kho(
        &m,
        0x10_0000,
        0x11_0000,
        u32::MAX,
        0x12_0000,
        &build::hwpoison(2, 4, &[0x1234]),
    );
    let mut junk = hw.clone();
    junk[0] = 0;
    put_kho(&m, 0x20_0000, 0x21_0000, 1000, 0x22_0000, &junk);
    let v = observe_all(&m, &t, &[0x77_000]);
    assert_eq!((v.root, v.kexec_count), (Some(0x80_0000), Some(1)));
    assert_eq!(v.comparison, Comparison::Agree);
    assert_eq!(v.rejected_total, 2);
    assert_eq!(v.rejected[0].root, 0x10_0000);
    assert_eq!(v.rejected[0].kexec_count, Some(u32::MAX));
    assert!(v.rejected[0].reason.contains(
        "forged or stale: not the root the running kernel published (pinned at hello at 0x800000)"
    ));
    assert!(
        v.rejected[1].reason.contains("bad magic"),
        "{}",
        v.rejected[1].reason
    );
}

#[test]
fn many_bare_roots_hide_nothing() {
    let m = guest();
    put_kho(
        &m,
        0xf0_0000,
        0xf1_0000,
        1,
        0xf2_0000,
        &build::hwpoison(2, 4, &[0x77]),
    );
    let t = pinned(&m);
    let n = MAX_REJECTED as u64 + 8;
    for i in 0..n {
        put(&m, 0x1000 * (i + 1), &build::kho_root(0, &[]));
    }
    let v = observe_all(&m, &t, &[0x77_000]);
    assert_eq!(v.root, Some(0xf0_0000));
    assert_eq!(v.comparison, Comparison::Agree);
    assert_eq!(u64::from(v.rejected_total), n);
    assert_eq!(v.rejected.len(), MAX_REJECTED);
    assert!(v.rejected[0]
        .reason
        .contains("bare root without kexec-metadata"));
    // And at a hello, the bare roots are no candidates for the pin.
    let t = pinned(&m);
    assert!(matches!(
        t.pin(),
        Pin::Pinned {
            root: 0xf0_0000,
            ..
        }
    ));
}

#[test]
fn two_new_roots_at_a_hello_are_ambiguous() {
    let m = guest();
    let hw = build::hwpoison(2, 4, &[0x77]);
    put_kho(&m, 0x10_0000, 0x11_0000, 1, 0x12_0000, &hw);
    put_kho(&m, 0x20_0000, 0x21_0000, 1, 0x22_0000, &hw);
    let t = pinned(&m);
    assert!(matches!(t.pin(), Pin::Ambiguous { qualifying: 2, .. }));
    let v = observe_all(&m, &t, &[0x77_000]);
    assert!(
        matches!(v.hwpoison, Hwpoison::Unpinned { ref reason } if reason.contains("ambiguous"))
    );
    assert_eq!((v.root, v.comparison.clone()), (None, Comparison::Unknown));
    assert_eq!(v.rejected_total, 2);
    // No KHO root at all: absent, not unpinned.
    let v = observe_all(&guest(), &pinned(&guest()), &[0x1000]);
    assert_eq!((v.root, v.hwpoison), (None, Hwpoison::Absent));
    // Before any hello.
    let v = observe_all(&m, &KhoTracker::new(), &[]);
    assert!(matches!(v.hwpoison, Hwpoison::Unpinned { .. }));
}

#[test]
fn after_a_kexec_the_new_root_is_pinned_and_the_old_one_kept() {
    let m = guest();
    let hw = build::hwpoison(2, 4, &[0x77]);
    put_kho(&m, 0x10_0000, 0x11_0000, 1, 0x12_0000, &hw);
    let mut t = pinned(&m);
    // A forger plants a root with the next count before the kexec.
    put_kho(&m, 0x30_0000, 0x31_0000, 2, 0x32_0000, &hw);
    t.before_kexec(&m, &BTreeSet::new());
    // The new kernel's root.
    put_kho(&m, 0x50_0000, 0x51_0000, 2, 0x52_0000, &hw);
    t.at_hello(&m, &BTreeSet::new(), 1);
    assert_eq!(
        t.pin(),
        &Pin::Pinned {
            root: 0x50_0000,
            kexec_count: 2,
            handoff: Handoff::Kept {
                previous: 0x10_0000
            }
        }
    );
    let v = observe_all(&m, &t, &[0x77_000]);
    assert_eq!(v.comparison, Comparison::Agree);
    let old = v.rejected.iter().find(|r| r.root == 0x10_0000).unwrap();
    assert!(
        old.reason.contains("an earlier kernel's root"),
        "{}",
        old.reason
    );
    // The next kexec: the old root vanished.
    t.before_kexec(&m, &BTreeSet::new());
    put(&m, 0x50_0000, &[0; 64]);
    put_kho(&m, 0x70_0000, 0x71_0000, 3, 0x72_0000, &hw);
    t.at_hello(&m, &BTreeSet::new(), 2);
    assert!(matches!(
        t.pin(),
        Pin::Pinned {
            root: 0x70_0000,
            handoff: Handoff::Missing {
                previous: 0x50_0000,
                ..
            },
            ..
        }
    ));
    // A hello that finds only stale roots fails, loudly.
    t.before_kexec(&m, &BTreeSet::new());
    t.at_hello(&m, &BTreeSet::new(), 3);
    assert!(matches!(
        t.pin(),
        Pin::Failed {
            expected_count: 4,
            ..
        }
    ));
}

#[test]
fn hostile_subtrees_are_reported_not_trusted() {
    let m = guest();
    put(&m, 0x41_0000, &build::metadata(1));
    // Blob size beyond the limit, blob outside guest RAM, torn list, v1.
    for (addr, size, blob, want) in [
        (
            0x50_0000u64,
            kho::MAX_HWPOISON_BLOB + 8,
            build::hwpoison(2, 4, &[1]),
            "not readable",
        ),
        (
            0xffff_0000_0000,
            56,
            build::hwpoison(2, 4, &[1]),
            "not readable",
        ),
        (0x50_0000, 56, build::hwpoison(3, 4, &[1]), "odd seq"),
        (
            0x50_0000,
            56,
            build::hwpoison_raw(1, 0, 2, 4, &[1]),
            "version 1",
        ),
        (0x50_0008, 56, build::hwpoison(2, 4, &[1]), "page-aligned"),
    ] {
        put(
            &m,
            0x40_0000,
            &build::kho_root(
                0,
                &[("kexec-metadata", 0x41_0000, 73), ("hwpoison", addr, size)],
            ),
        );
        put(&m, 0x50_0000, &blob);
        let v = observe_all(&m, &pinned(&m), &[]);
        match v.hwpoison {
            Hwpoison::Invalid { reason } => assert!(reason.contains(want), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(v.comparison, Comparison::Unknown);
    }
}

use ras::kho;

#[test]
fn corrupting_the_pinned_blob() {
    let m = guest();
    put_kho(
        &m,
        0x10_0000,
        0x11_0000,
        1,
        0x12_0000,
        &build::hwpoison(2, 600, &[0x77]),
    );
    let t = pinned(&m);
    let c = corrupt::corrupt(
        &m,
        &BTreeSet::new(),
        &t,
        &[
            Edit::Wrap,
            Edit::BeyondRam,
            Edit::Duplicate,
            Edit::BadType(9),
        ],
    )
    .unwrap();
    assert_eq!((c.applied.nr_entries, c.applied.seq, c.written), (5, 4, 56));
    let v = observe_all(&m, &t, &[0x77_000]);
    match &v.hwpoison {
        Hwpoison::Valid { rejected, .. } => assert_eq!(rejected.len(), 4),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(v.comparison, Comparison::Differ { ref unplaceable, .. } if unplaceable.len() == 2)
    );
    // Moved to the last page: the blob runs off the end of RAM.
    let c = corrupt::corrupt(&m, &BTreeSet::new(), &t, &[Edit::MoveTo(Place::LastPage)]).unwrap();
    assert_eq!(
        (c.applied.moved_to, c.written),
        (Some((16 << 20) - 4096), 4096)
    );
    let v = observe_all(&m, &t, &[]);
    assert!(
        matches!(v.hwpoison, Hwpoison::Invalid { ref reason } if reason.contains("not readable"))
    );
    // Nothing pinned: a one-line error.
    assert!(corrupt::corrupt(&m, &BTreeSet::new(), &KhoTracker::new(), &[Edit::Wrap]).is_err());
}

#[test]
fn a_new_root_where_an_old_one_was_is_new() {
    // Two kexecs on: the third kernel's root lands where the first one's
    // was, with the same FDT bytes (same blob addresses); only its
    // metadata (the next count) differs.
    let m = guest();
    let hw = build::hwpoison(2, 4, &[0x77]);
    put_kho(&m, 0x10_0000, 0x11_0000, 1, 0x12_0000, &hw);
    let mut t = pinned(&m);
    t.before_kexec(&m, &BTreeSet::new());
    put_kho(&m, 0x20_0000, 0x21_0000, 2, 0x22_0000, &hw);
    t.at_hello(&m, &BTreeSet::new(), 1);
    t.before_kexec(&m, &BTreeSet::new());
    put_kho(&m, 0x10_0000, 0x11_0000, 3, 0x12_0000, &hw);
    t.at_hello(&m, &BTreeSet::new(), 2);
    assert!(matches!(
        t.pin(),
        Pin::Pinned {
            root: 0x10_0000,
            kexec_count: 3,
            handoff: Handoff::Kept {
                previous: 0x20_0000
            }
        }
    ));
}
