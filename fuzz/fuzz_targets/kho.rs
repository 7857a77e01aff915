//! Guest memory as the KHO observer reads it: a page that looks like an FDT,
//! then the blobs its subtrees point at. The guest controls every byte;
//! parsing must refuse or accept without panicking, and what it accepts
//! must be bounded by what it was given. The `kho-corrupt` edits run over
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ras::kho::{self, corrupt, EntryType, HwpoisonList};

fuzz_target!(|data: &[u8]| {
    if let Ok(root) = kho::parse_root(data) {
        assert!(root.total_size as usize <= data.len().min(kho::MAX_FDT_SIZE));
        assert!(root.subtrees.len() <= 64);
        for (i, s) in root.subtrees.iter().enumerate() {
            assert!(root.subtrees[..i].iter().all(|o| o.name != s.name));
        }
    }
    let _ = kho::kexec_count(data);
    if let Ok(list) = HwpoisonList::parse(data) {
        let nr = u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize;
        assert!(nr * 8 + kho::HWPOISON_HEADER_LEN <= data.len());
        assert_eq!(list.entries.len() + list.rejected.len(), nr);
        assert!(list.entries.windows(2).all(|w| w[0].pfn < w[1].pfn));
        assert!(list
            .entries
            .iter()
            .all(|e| e.pfn.checked_mul(4096).is_some()));
        assert_eq!(list.incomplete, list.flags & 1 != 0);
        let minor = list.version & 0xff;
        assert!(
            minor > 0
                || list
                    .entries
                    .iter()
                    .all(|e| !matches!(e.kind, EntryType::Unknown(_)))
        );
        assert_eq!(list.version >> 8, 2);
    }
    // The corrupting edits, chosen by the first byte, over a copy.
    if let Some((&pick, rest)) = data.split_first() {
        let edits = [
            corrupt::Edit::Wrap,
            corrupt::Edit::BeyondRam,
            corrupt::Edit::Duplicate,
            corrupt::Edit::BadType(pick),
            corrupt::Edit::Version(u16::from(pick)),
            corrupt::Edit::MoveTo(corrupt::Place::LastPage),
        ];
        let n = usize::from(pick) % (edits.len() + 1);
        let mut copy = rest.to_vec();
        if let Ok(a) = corrupt::apply(&mut copy, &edits[..n], u64::from(pick) << 20) {
            assert!(a.appended.len() <= n);
            assert_eq!(copy.len(), rest.len());
        }
    }
});
