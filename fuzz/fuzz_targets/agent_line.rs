//! Whatever the guest sends on the agent UART: split into bounded lines,
//! each decoded and validated. Nothing may panic or grow without bound.
#![no_main]

use guest_agent::{decode_agent_message, LineBuffer, MAX_LINE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = LineBuffer::new();
    lines.push(data, |l| {
        if let Ok(l) = l {
            assert!(l.len() <= MAX_LINE);
            let _ = decode_agent_message(l);
        }
    });
    let _ = decode_agent_message(data);
});
