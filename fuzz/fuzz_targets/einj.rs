//! The guest's accesses to the EINJ window (hostile input): any sequence of
//! reads and writes, at any offset and width, must neither panic nor leave
//! the window inconsistent; every request it hands out is one EXECUTE,
//! answered (a stale answer ignored) before the next; validation accepts
//! only the memory types, with the page inside the address the guest named.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ras::einj::{validate, CommandStatus, Kind, Window, WINDOW_SIZE};

fuzz_target!(|data: &[u8]| {
    let mut w = Window::new(0x0902_0000);
    // Each access: 2 bytes of offset (covering a little past the window),
    // 1 byte of width (0-8) and direction, then the bytes written.
    let mut rest = data;
    while rest.len() >= 3 {
        let offset = u64::from(u16::from_le_bytes([rest[0], rest[1]])) % (WINDOW_SIZE + 64);
        let width = usize::from(rest[2] & 0xf) % 9;
        let write = rest[2] & 0x80 != 0;
        rest = &rest[3..];
        if write {
            let n = width.min(rest.len());
            let was_busy = w.busy();
            if let Some(op) = w.write(offset, &rest[..n]) {
                assert!(!was_busy && w.busy());
                let r = op.request;
                if let Ok(p) = validate(&r) {
                    assert!(matches!(p.kind, Kind::Correctable | Kind::Uncorrectable | Kind::Fatal));
                    assert_eq!(p.page % 4096, 0);
                    assert_eq!(p.page, r.memory_address & r.memory_address_range & !0xfff);
                }
                // A stale answer changes nothing; the right one ends it.
                w.complete(op.id.wrapping_add(1), CommandStatus::Success);
                assert!(w.busy());
                w.complete(op.id, CommandStatus::InvalidAccess);
                assert!(!w.busy());
            }
            rest = &rest[n..];
        } else {
            let mut out = [0u8; 8];
            w.read(offset, &mut out[..width]);
        }
    }
});
