//! Guest memory as the KHO observer reads it: a page that looks like an FDT,
//! then the blobs its subtrees point at. The guest controls every byte;
//! parsing must refuse or accept without panicking, and what it accepts
//! must be bounded by what it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ras::kho::{self, HwpoisonList};

fuzz_target!(|data: &[u8]| {
    if let Ok(root) = kho::parse_root(data) {
        assert!(root.total_size as usize <= data.len());
        assert!(root.subtrees.len() <= 65);
    }
    let _ = kho::kexec_count(data);
    if let Ok(list) = HwpoisonList::parse(data) {
        assert!(list.pfns.len() * 8 + kho::HWPOISON_HEADER_LEN <= data.len());
        assert!(list.pfns.windows(2).all(|w| w[0] < w[1]));
    }
});
