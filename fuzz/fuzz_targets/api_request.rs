//! Control API request lines and the CLI client's request words.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vmm::api::parse(text);
        let _ = vmm::api::client_request(text);
    }
});
