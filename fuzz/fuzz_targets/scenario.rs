//! Steps and scenario files, as a user or a lab would write them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vmm::steps::parse(text);
        if let Ok(s) = vmm::scenario::Scenario::parse(text) {
            for step in &s.steps {
                assert!(
                    vmm::steps::parse(step).is_ok(),
                    "a parsed scenario's steps parse"
                );
            }
        }
    }
});
