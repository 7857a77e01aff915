//! The VMM end of the guest agent channel (COM2 on x86_64, the second
//! PL011 on aarch64).
//!
//! [`AgentPort`] is the UART the agent talks through: bytes the agent sends
//! become [`VmEvent::Agent`] lines; requests are queued and fed into the
//! UART's receive FIFO as the guest drains it. Both UART models raise their
//! interrupt whenever the line goes high (devices/src/legacy), so a refill
//! never needs a nudge from the VMM. The typed request/response
//! logic is in the session (`Session::call`).

use std::collections::VecDeque;
use std::io::{self, Write};

use devices::bus::BusDevice;
use devices::legacy::Uart;
use guest_agent::LineBuffer;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::event::{EventSender, VmEvent};

/// Most request bytes waiting for the guest to read.
const MAX_PENDING: usize = 1 << 20;

/// Errors sending to the agent.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// The guest is not reading the channel.
    #[error("Agent channel is full: the guest has not read {0} queued bytes")]
    Full(usize),
}

/// Bytes from the agent, split into bounded lines.
pub struct AgentOut {
    lines: LineBuffer,
    events: EventSender,
}

impl Write for AgentOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let events = &self.events;
        self.lines.push(buf, |l| {
            let _ = events.send(VmEvent::Agent(l.map(<[u8]>::to_vec)));
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The agent's UART (COM2 on x86_64, the second PL011 on aarch64).
pub struct AgentPort {
    uart: Box<dyn Uart<AgentOut>>,
    pending: VecDeque<u8>,
    /// Guest reads of the receive buffer, to tell a stalled reader.
    reads: u64,
}

impl AgentPort {
    /// A port of UART model `U` raising `irq` and reporting agent lines to
    /// `events`.
    pub fn new<U: Uart<AgentOut> + 'static>(
        irq: EventFd,
        events: EventSender,
    ) -> std::io::Result<Self> {
        let out = AgentOut {
            lines: LineBuffer::new(),
            events,
        };
        Ok(Self {
            uart: Box::new(U::new(irq, out)),
            pending: VecDeque::new(),
            reads: 0,
        })
    }

    /// Whether bytes are waiting for the guest to read them.
    pub fn rx_waiting(&mut self) -> bool {
        !self.pending.is_empty() || self.uart.rx_waiting()
    }

    /// Guest reads of the receive buffer so far.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Queues bytes for the agent.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if self.pending.len() + bytes.len() > MAX_PENDING {
            return Err(Error::Full(self.pending.len()));
        }
        self.pending.extend(bytes);
        self.pump();
        Ok(())
    }

    fn pump(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = self.uart.enqueue(self.pending.make_contiguous());
        self.pending.drain(..n);
    }
}

impl BusDevice for AgentPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.uart.read(offset, data);
        if offset == 0 {
            self.reads += 1;
        }
        // The guest just took a byte or looked at the line status: refill.
        self.pump();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.uart.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x86's agent UART, whose driver model (devices' linux8250) these
    /// tests drive.
    type Serial = devices::legacy::SerialPort<AgentOut>;

    #[test]
    fn long_requests_are_paced_through_the_fifo() {
        let (tx, _rx) = crate::event::queue().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut p = AgentPort::new::<Serial>(irq, tx).unwrap();
        let msg: Vec<u8> = (0..200u8).collect();
        p.send(&msg).unwrap();
        let mut got = Vec::new();
        for _ in 0..1000 {
            let mut lsr = [0u8];
            p.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            p.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, msg);
        assert_eq!(p.reads(), 200);
        assert!(!p.rx_waiting());
    }

    /// Requests of every length up to 1,200 bytes and the protocol's
    /// longest line, each sent to a guest modelled on Linux's 8250 driver
    /// (256 characters per receive call, then IIR decides whether to go
    /// on), each answered before the next as in the protocol: every request
    /// arrives whole, with no help from the VMM. Before the UART raised RDA
    /// from its FIFO's contents, the 257-byte request stalled here (and
    /// every length of 256k+1..=256k+63). With a reply still going out in
    /// the same handler run, the old UART's THRE identification kept the
    /// handler looping, which is why the issue met the stall on the first
    /// request after boot.
    #[test]
    fn requests_of_every_length_reach_the_8250_driver() {
        use devices::legacy::linux8250::Linux8250;
        let (tx, rx) = crate::event::queue().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut p = AgentPort::new::<Serial>(irq.try_clone().unwrap(), tx).unwrap();
        let mut guest = Linux8250::new();
        guest.startup(&mut p);
        guest.serve(&mut p, &irq);
        let mut want = Vec::new();
        for len in (1..=1200usize).chain([guest_agent::MAX_LINE + 1]) {
            let mut line: Vec<u8> = (b' '..=b'z').cycle().take(len - 1).collect();
            line.push(b'\n');
            p.send(&line).unwrap();
            guest.serve(&mut p, &irq);
            assert!(!p.rx_waiting(), "{len}-byte request stalled");
            want.extend_from_slice(&line);
            guest.write(&mut p, b"{\"ok\":1}\n");
            guest.serve(&mut p, &irq);
        }
        assert_eq!(guest.received, want);
        assert_eq!(guest.pass_limit_hits, 0);
        assert_eq!(rx.try_iter().count(), 1201, "every reply came out");
    }

    #[test]
    fn agent_output_becomes_lines() {
        let (tx, rx) = crate::event::queue().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut p = AgentPort::new::<Serial>(irq, tx).unwrap();
        for b in b"{\"a\":1}\n" {
            p.write(0, &[*b]);
        }
        match rx.try_recv().unwrap() {
            VmEvent::Agent(Ok(l)) => assert_eq!(l, b"{\"a\":1}"),
            _ => panic!("expected an agent line"),
        }
    }

    #[test]
    fn a_guest_that_never_reads_fills_up() {
        let (tx, _rx) = crate::event::queue().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut p = AgentPort::new::<Serial>(irq, tx).unwrap();
        let chunk = vec![b'x'; 4096];
        let mut err = None;
        for _ in 0..(MAX_PENDING / 4096 + 2) {
            if let Err(e) = p.send(&chunk) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(Error::Full(_))));
    }
}
