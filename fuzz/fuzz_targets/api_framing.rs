//! The control API connection's line framing: arbitrary bytes, cut into
//! arbitrary chunks (the first byte picks the chunk size), through the
//! framer and the request decoder. Checks what the framer promises: no
//! line over MAX_LINE, no newline inside a line, TooLong at most once and
//! last, the buffer bounded, and the lines are the input's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::wire::{decode, Frame, Framer, MAX_LINE};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(cut).max(1) * 97;
    let mut f = Framer::new();
    let mut rebuilt = Vec::new();
    let mut too_long = false;
    for piece in stream.chunks(chunk) {
        f.push(piece);
        while let Some(frame) = f.next_frame() {
            assert!(!too_long, "a frame after TooLong");
            match frame {
                Frame::Line(l) => {
                    assert!(l.len() <= MAX_LINE);
                    assert!(!l.contains(&b'\n'));
                    let _ = decode(&l);
                    rebuilt.extend_from_slice(&l);
                    rebuilt.push(b'\n');
                }
                Frame::TooLong => too_long = true,
            }
        }
        assert!(f.pending() <= MAX_LINE, "the framer holds one partial line at most");
    }
    if !too_long {
        assert_eq!(rebuilt.len() + f.pending(), stream.len());
        assert_eq!(&stream[..rebuilt.len()], &rebuilt[..]);
    }
});
