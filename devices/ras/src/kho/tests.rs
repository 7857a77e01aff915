use super::*;

#[test]
fn kho_root_with_subtrees() {
    let f = build::kho_root(
        0x1234_5000,
        &[
            ("kexec-metadata", 0x7000, 73),
            ("hwpoison", 0x9000, 24 + 8 * 4),
        ],
    );
    let r = parse_root(&f).unwrap();
    assert_eq!(r.memory_map, 0x1234_5000);
    assert_eq!(r.total_size as usize, f.len());
    assert_eq!(
        r.subtree("hwpoison"),
        Some(&Subtree {
            name: "hwpoison".into(),
            blob: 0x9000,
            size: 56
        })
    );
    assert_eq!(r.subtree("kexec-metadata").unwrap().blob, 0x7000);
    assert!(r.subtree("luo").is_none());
    let off = subtree_prop_offset(&f, "hwpoison", "preserved-data").unwrap();
    assert_eq!(&f[off..off + 8], &0x9000u64.to_le_bytes());
}

#[test]
fn not_kho_or_broken() {
    let other = build::fdt(&[("compatible", b"kho-v3\0".to_vec())], &[]);
    assert_eq!(parse_root(&other), Err(Error::NotKho));
    assert_eq!(parse_root(&[0u8; 64]), Err(Error::NotFdt));
    let good = build::kho_root(1, &[("hwpoison", 2, 3)]);
    // Truncated: total size beyond the bytes.
    assert!(matches!(
        parse_root(&good[..good.len() - 1]),
        Err(Error::Header(_))
    ));
    // A subtree without blob-size.
    let bad = build::fdt(
        &build::root_props(1),
        &[(
            "hwpoison",
            vec![("preserved-data", 5u64.to_le_bytes().to_vec())],
        )],
    );
    assert_eq!(parse_root(&bad), Err(Error::Subtree("hwpoison".into())));
    // A property length running past the block.
    let mut f = good.clone();
    let off_struct = u32::from_be_bytes(f[8..12].try_into().unwrap()) as usize;
    // Root: BEGIN_NODE "" (8 bytes), then the first PROP's length.
    f[off_struct + 12..off_struct + 16].copy_from_slice(&0xffffu32.to_be_bytes());
    assert!(matches!(parse_root(&f), Err(Error::Structure(_))));
    // An unknown token.
    let mut f = good;
    f[off_struct..off_struct + 4].copy_from_slice(&7u32.to_be_bytes());
    assert!(matches!(parse_root(&f), Err(Error::Structure(_))));
}

#[test]
fn only_what_the_kernel_writes() {
    let sub = || vec![("hwpoison", build::subtree_props(0x9000, 56))];
    // Two top-level nodes: the second's hwpoison child is no subtree.
    let two = build::fdt_nodes(&[
        ("", build::root_props(0), vec![]),
        ("", build::root_props(0), sub()),
    ]);
    assert_eq!(
        parse_root(&two),
        Err(Error::Shape("more than one top-level node"))
    );
    // A named root; a grandchild; an extra property; a duplicate subtree.
    let named = build::fdt_nodes(&[("x", build::root_props(0), sub())]);
    assert!(matches!(parse_root(&named), Err(Error::Shape(_))));
    let mut extra = build::root_props(0);
    extra.push(("linux,extra", vec![1]));
    assert!(matches!(
        parse_root(&build::fdt(&extra, &sub())),
        Err(Error::Shape(_))
    ));
    let mut props = build::subtree_props(0x9000, 56);
    props.push(("blob-size", 8u64.to_le_bytes().to_vec()));
    assert!(matches!(
        parse_root(&build::fdt(&build::root_props(0), &[("hwpoison", props)])),
        Err(Error::Subtree(_))
    ));
    let dup = build::kho_root(0, &[("hwpoison", 1, 2), ("hwpoison", 3, 4)]);
    assert_eq!(parse_root(&dup), Err(Error::Subtree("hwpoison".into())));
    // compatible with trailing bytes, or a second string.
    let mut p = build::root_props(0);
    p[0].1 = b"kho-v4\0kho-v5\0".to_vec();
    assert_eq!(parse_root(&build::fdt(&p, &[])), Err(Error::NotKho));
    // A header version other than 17, or a reservation map entry.
    let mut f = build::kho_root(0, &[]);
    f[20..24].copy_from_slice(&16u32.to_be_bytes());
    assert!(matches!(parse_root(&f), Err(Error::Header(_))));
    let mut f = build::kho_root(0, &[]);
    f[40] = 1;
    assert!(matches!(parse_root(&f), Err(Error::Header(_))));
    // Larger than a page.
    let mut f = build::kho_root(0, &[]);
    f.resize(8192, 0);
    f[4..8].copy_from_slice(&8192u32.to_be_bytes());
    assert!(matches!(parse_root(&f), Err(Error::Header(_))));
    // A bare root is a root.
    assert_eq!(
        parse_root(&build::kho_root(7, &[])).unwrap().subtrees,
        vec![]
    );
}

#[test]
fn metadata_blob() {
    assert_eq!(kexec_count(&build::metadata(3)), Ok(3));
    assert!(kexec_count(&build::metadata(3)[..72]).is_err());
    let mut m = build::metadata(1);
    m[0] = 2;
    assert_eq!(kexec_count(&m), Err(Error::Metadata("version is not 1")));
    m[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(kexec_count(&m), Err(Error::Metadata("version is not 1")));
    let mut m = build::metadata(1);
    m[4..69].fill(b'a');
    assert!(kexec_count(&m).is_err());
}

fn parse_raw(version: u16, flags: u16, raw: &[u64]) -> Result<HwpoisonList, Error> {
    HwpoisonList::parse(&build::hwpoison_raw(version, flags, 2, 8, raw))
}

#[test]
fn hwpoison_blob() {
    let l = HwpoisonList::parse(&build::hwpoison(4, 8, &[0x300, 0x100, 0x300, 0x200])).unwrap();
    assert_eq!(l.pfns(), vec![0x100, 0x200, 0x300]);
    assert_eq!(l.duplicates, 1);
    assert_eq!(l.rejected.len(), 1);
    assert_eq!(
        (l.rejected[0].index, l.rejected[0].problem),
        (2, EntryProblem::Duplicate)
    );
    assert_eq!(l.seq, 4);
    assert!(!l.incomplete);
    let good = build::hwpoison(2, 4, &[1, 2]);
    assert!(HwpoisonList::parse(&good[..good.len() - 8]).is_err());
    let mut b = good.clone();
    b[0] = b'X';
    assert_eq!(HwpoisonList::parse(&b), Err(Error::Hwpoison("bad magic")));
    let mut b = good.clone();
    b[8] = 5;
    assert_eq!(
        HwpoisonList::parse(&b),
        Err(Error::Hwpoison("more PFNs than capacity"))
    );
    let mut b = good.clone();
    b[16] = 3;
    assert_eq!(
        HwpoisonList::parse(&b),
        Err(Error::Hwpoison("being updated (odd seq)"))
    );
    assert!(HwpoisonList::parse(&[0; 10]).is_err());
}

#[test]
fn incomplete_is_a_flag_not_an_error() {
    let l = parse_raw(
        0x0200,
        HWPOISON_F_INCOMPLETE,
        &[build::entry(5, EntryType::Hardware)],
    )
    .unwrap();
    assert!(l.incomplete);
    assert_eq!(l.pfns(), vec![5]);
    // Reserved bits in minor 0 are refused; in a later minor, ignored.
    assert_eq!(
        parse_raw(0x0200, 3, &[]),
        Err(Error::Hwpoison("reserved flag bits set in minor 0"))
    );
    let l = parse_raw(0x0201, 3, &[]).unwrap();
    assert!(l.incomplete);
    assert_eq!(l.unknown_flags, 2);
}

#[test]
fn versions() {
    assert!(matches!(
        HwpoisonList::parse(&build::hwpoison_raw(1, 0, 2, 4, &[1])),
        Err(Error::Hwpoison(r)) if r.contains("version 1")
    ));
    assert_eq!(
        parse_raw(0x0300, 0, &[]),
        Err(Error::Hwpoison("unknown major version"))
    );
    assert!(parse_raw(0x02ff, 0, &[]).is_ok());
}

#[test]
fn types_round_trip_and_bad_entries_are_rejected() {
    let kinds = [
        EntryType::Hardware,
        EntryType::Simulated,
        EntryType::SoftOffline,
    ];
    let raw: Vec<u64> = kinds
        .iter()
        .zip(10..)
        .map(|(k, p)| build::entry(p, *k))
        .collect();
    let l = parse_raw(0x0200, 0, &raw).unwrap();
    let got: Vec<EntryType> = l.entries.iter().map(|e| e.kind).collect();
    assert_eq!(got, kinds);
    assert!(l.entries.iter().zip(&raw).all(|(e, r)| e.raw() == *r));
    // Type 0, type 9 (minor 0), a wrapping PFN, a duplicate.
    let raw = [
        7,
        (9 << 56) | 8,
        build::entry(1 << 52, EntryType::Hardware),
        build::entry(0x77, EntryType::Hardware),
        build::entry(0x77, EntryType::Simulated),
    ];
    let l = parse_raw(0x0200, 0, &raw).unwrap();
    assert_eq!(l.pfns(), vec![0x77]);
    assert_eq!(l.entries[0].kind, EntryType::Hardware);
    let problems: Vec<(u32, EntryProblem)> =
        l.rejected.iter().map(|r| (r.index, r.problem)).collect();
    assert_eq!(
        problems,
        vec![
            (0, EntryProblem::InvalidType(0)),
            (1, EntryProblem::InvalidType(9)),
            (2, EntryProblem::AddressWraps),
            (4, EntryProblem::Duplicate),
        ]
    );
    // A later minor keeps unknown types, flagged; type 0 stays invalid.
    let l = parse_raw(0x0201, 0, &raw[..2]).unwrap();
    assert_eq!(
        l.entries,
        vec![Entry {
            pfn: 8,
            kind: EntryType::Unknown(9)
        }]
    );
    assert_eq!(l.rejected.len(), 1);
}

#[test]
fn corruption_keeps_the_header_consistent() {
    use corrupt::{apply, Edit, Place};
    let mut b = build::hwpoison(4, 4, &[0x77]);
    let a = apply(
        &mut b,
        &[Edit::BeyondRam, Edit::Wrap, Edit::Duplicate],
        16 << 20,
    )
    .unwrap();
    assert_eq!((a.nr_entries, a.seq), (4, 6));
    let l = HwpoisonList::parse(&b).unwrap();
    assert_eq!(l.pfns(), vec![0x77, (16 << 8) + 0x100]);
    assert_eq!(l.rejected.len(), 2);
    // Full now.
    assert!(apply(&mut b, &[Edit::BadType(0)], 16 << 20).is_err());
    let mut b = build::hwpoison(4, 4, &[]);
    assert!(apply(&mut b, &[Edit::Duplicate], 1 << 20).is_err());
    let a = apply(
        &mut b,
        &[
            Edit::Version(1),
            Edit::Seq(7),
            Edit::MoveTo(Place::LastPage),
        ],
        1 << 20,
    )
    .unwrap();
    assert_eq!((a.version, a.seq, a.moved_to), (1, 7, Some(0xff000)));
    assert!(apply(&mut [0u8; 8], &[], 0).is_err());
}
