//! The control API's line framing, apart from any socket so that it can be
//! fuzzed: bytes in, request lines out, each at most [`MAX_LINE`] bytes
//! before its newline.
//!
//! A line longer than that cannot be resynchronised (its end is unknown), so
//! it ends the connection; bytes after the last newline when the stream ends
//! are a partial request and are never executed.

use super::{parse, Envelope};

/// Longest request line, not counting its newline; `parse` takes the same.
pub const MAX_LINE: usize = 64 * 1024;

/// What the framer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its newline, at most [`MAX_LINE`] bytes.
    Line(Vec<u8>),
    /// More than [`MAX_LINE`] bytes without a newline; nothing follows.
    TooLong,
}

/// Cuts a byte stream into lines, holding at most one partial line.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// First byte not yet framed.
    start: usize,
    /// Bytes from `start` already searched for a newline.
    scanned: usize,
    /// A line was too long: the stream is over.
    broken: bool,
}

impl Framer {
    /// An empty framer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes; call [`Framer::next_frame`] until `None`
    /// before pushing again, which keeps the buffer under `MAX_LINE` plus
    /// one push.
    pub fn push(&mut self, data: &[u8]) {
        if self.broken {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete line, or `TooLong` once, or `None` when more bytes
    /// are needed.
    pub fn next_frame(&mut self) -> Option<Frame> {
        if self.broken {
            return None;
        }
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let unseen = pending.get(self.scanned..).unwrap_or_default();
        match unseen.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let end = self.scanned + i;
                if end > MAX_LINE {
                    return Some(self.break_off());
                }
                let line = pending.get(..end).unwrap_or_default().to_vec();
                self.start += end + 1;
                self.scanned = 0;
                Some(Frame::Line(line))
            }
            None if pending.len() > MAX_LINE => Some(self.break_off()),
            None => {
                self.scanned = pending.len();
                None
            }
        }
    }

    /// Bytes received after the last complete line: a partial request if
    /// the stream ends now.
    pub fn pending(&self) -> usize {
        if self.broken {
            0
        } else {
            self.buf.len().saturating_sub(self.start)
        }
    }

    fn break_off(&mut self) -> Frame {
        self.broken = true;
        self.buf = Vec::new();
        self.start = 0;
        self.scanned = 0;
        Frame::TooLong
    }
}

/// A framed line as a request: UTF-8 (refused, never repaired), then JSON;
/// the error is what to tell the client.
pub fn decode(line: &[u8]) -> Result<Envelope, String> {
    let text = std::str::from_utf8(line).map_err(|e| {
        format!(
            "request is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    parse(text)
}

#[cfg(test)]
mod tests {
    use super::super::Request;
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::new();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c);
            while let Some(x) = f.next_frame() {
                out.push(x);
            }
        }
        out
    }

    #[test]
    fn lines_across_chunks() {
        assert_eq!(
            frames(&[b"ab", b"c\nde\n\nf", b"g\n"]),
            vec![
                Frame::Line(b"abc".to_vec()),
                Frame::Line(b"de".to_vec()),
                Frame::Line(Vec::new()),
                Frame::Line(b"fg".to_vec()),
            ]
        );
    }

    #[test]
    fn exactly_max_line_passes_one_more_is_refused() {
        // A valid request padded with spaces to exactly MAX_LINE bytes.
        let mut req = br#"{"id":9,"request":"state"}"#.to_vec();
        req.resize(MAX_LINE, b' ');
        let text = std::str::from_utf8(&req).unwrap();
        assert_eq!(parse(text).unwrap().request, Request::State);
        let mut sent = req.clone();
        sent.push(b'\n');
        // In one push and byte by byte.
        assert_eq!(frames(&[&sent]), vec![Frame::Line(req.clone())]);
        let mut f = Framer::new();
        let mut got = Vec::new();
        for b in &sent {
            f.push(std::slice::from_ref(b));
            got.extend(std::iter::from_fn(|| f.next_frame()));
        }
        assert_eq!(got, vec![Frame::Line(req.clone())]);
        assert_eq!(decode(&req).unwrap().id, 9);

        let mut long = req.clone();
        long.push(b' ');
        assert!(parse(std::str::from_utf8(&long).unwrap()).is_err());
        long.push(b'\n');
        assert_eq!(frames(&[&long]), vec![Frame::TooLong]);
        // Without a newline at all, refused as soon as it is too long.
        assert_eq!(frames(&[&long[..MAX_LINE + 1]]), vec![Frame::TooLong]);
        // Nothing after TooLong.
        assert_eq!(frames(&[&long, b"{}\n"]), vec![Frame::TooLong]);
        println!("MAX_LINE {MAX_LINE}: exactly accepted, one more refused");
    }

    #[test]
    fn partial_line_is_pending_not_a_frame() {
        let mut f = Framer::new();
        f.push(br#"{"id":1,"request":"shutdown"}"#);
        assert_eq!(f.next_frame(), None);
        assert_eq!(f.pending(), 29);
        f.push(b"\n");
        assert!(matches!(f.next_frame(), Some(Frame::Line(_))));
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn invalid_utf8_is_refused_not_repaired() {
        let e = decode(b"{\"id\":1,\"request\":{\"step\":\"exec:\xff\"}}").unwrap_err();
        assert!(e.starts_with("request is not UTF-8"), "{e}");
        // Overlong NUL and a lone surrogate, both invalid UTF-8.
        assert!(decode(b"{\"id\":1,\"request\":{\"step\":\"exec:\xc0\x80\"}}").is_err());
        assert!(decode(b"{\"id\":1,\"request\":{\"step\":\"exec:\xed\xa0\x80\"}}").is_err());
    }
}
