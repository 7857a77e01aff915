//! The guest console (COM1) sink: copies output to the user's target and
//! turns it into lines for the outcome classifier.

use std::io::{self, Write};

use crate::event::{EventSender, VmEvent};

/// Longest console line kept; longer lines are split.
const MAX_LINE: usize = 4096;

/// Receives bytes the guest transmits on COM1.
pub struct ConsoleOut {
    target: Option<Box<dyn Write + Send>>,
    line: Vec<u8>,
    events: EventSender,
}

impl ConsoleOut {
    /// Copies output to `target` (if any) and sends complete lines to `events`.
    pub fn new(target: Option<Box<dyn Write + Send>>, events: EventSender) -> Self {
        Self {
            target,
            line: Vec::with_capacity(256),
            events,
        }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        // The receiver is gone only when the run is over.
        let _ = self.events.send(VmEvent::Console(text));
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(t) = &mut self.target {
            // A console file that fails (disk full, closed pipe) is dropped
            // rather than stopping the guest.
            if t.write_all(buf).is_err() {
                self.target = None;
            }
        }
        for &b in buf {
            match b {
                b'\n' => {
                    self.emit();
                    if let Some(t) = &mut self.target {
                        let _ = t.flush();
                    }
                }
                b'\r' => {}
                _ => {
                    self.line.push(b);
                    if self.line.len() >= MAX_LINE {
                        self.emit();
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.target {
            Some(t) => t.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_drops_carriage_returns() {
        let (tx, rx) = crate::event::queue().unwrap();
        let mut c = ConsoleOut::new(None, tx);
        c.write_all(b"Linux version 7.3\r\nreboot: Po").unwrap();
        c.write_all(b"wer down\r\n").unwrap();
        let lines: Vec<String> = rx
            .try_iter()
            .map(|e| match e {
                VmEvent::Console(l) => l,
                _ => String::new(),
            })
            .collect();
        assert_eq!(lines, vec!["Linux version 7.3", "reboot: Power down"]);
    }

    #[test]
    fn long_lines_are_split() {
        let (tx, rx) = crate::event::queue().unwrap();
        let mut c = ConsoleOut::new(None, tx);
        c.write_all(&vec![b'x'; MAX_LINE * 2 + 5]).unwrap();
        assert_eq!(rx.try_iter().count(), 2);
    }
}
