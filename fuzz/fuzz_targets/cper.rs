//! Raw CPER records from users (`ghes-raw`, the control API): the
//! validator must refuse or accept every byte string without panicking,
//! and whatever it accepts must have the shape Linux's GHES driver trusts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ras::cper::{validate, MAX_RECORD_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(summary) = validate(data) {
        assert!(data.len() <= MAX_RECORD_LEN);
        assert!(!summary.sections.is_empty());
        let block_status = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        assert_ne!(block_status & 3, 0);
    }
    // The hex form the steps take goes through the same gate.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(bytes) = vmm::ghes_sources::parse_hex(text, MAX_RECORD_LEN) {
            let _ = validate(&bytes);
        }
    }
});
