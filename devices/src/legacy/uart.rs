//! What rasvmm's two UART models share, apart from their registers: the
//! receive FIFO the VMM fills, the transmit side (a byte written goes to
//! the output sink at once), and the interrupt line, a level recomputed
//! after every access and delivered as an edge on each rise (see the
//! 16550A's and the PL011's module docs for why).

use std::collections::VecDeque;
use std::io::{self, Write};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Raises an interrupt by signalling an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `fd`.
    pub fn new(fd: EventFd) -> Self {
        Self(fd)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A UART's receive FIFO, output sink and interrupt line.
pub(super) struct UartCore<W: Write + Send> {
    rx: VecDeque<u8>,
    /// The receive FIFO's depth.
    depth: usize,
    /// The interrupt line's level as last computed.
    line: bool,
    irq: EventFdTrigger,
    out: W,
}

impl<W: Write + Send> UartCore<W> {
    /// A core with a receive FIFO of `depth` bytes, raising its interrupt
    /// through `irq` and writing output to `out`.
    pub(super) fn new(irq: EventFd, out: W, depth: usize) -> Self {
        Self {
            rx: VecDeque::with_capacity(depth),
            depth,
            line: false,
            irq: EventFdTrigger::new(irq),
            out,
        }
    }

    /// Queues bytes from the line, as many as the FIFO has room for;
    /// returns how many.
    pub(super) fn receive(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.depth - self.rx.len());
        self.rx.extend(&bytes[..n]);
        n
    }

    /// A transmitted byte looped back into the receive FIFO (dropped if it
    /// is full, as the hardware's overrun would).
    pub(super) fn loop_back(&mut self, byte: u8) {
        if self.rx.len() < self.depth {
            self.rx.push_back(byte);
        }
    }

    /// The guest's read of the next received byte.
    pub(super) fn read_byte(&mut self) -> Option<u8> {
        self.rx.pop_front()
    }

    /// Whether received bytes wait.
    pub(super) fn rx_waiting(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Whether the receive FIFO is full.
    pub(super) fn rx_full(&self) -> bool {
        self.rx.len() >= self.depth
    }

    /// Sends a byte to the output sink. A sink error (a closed console
    /// file) must not stop the guest: the byte is lost, as on a
    /// disconnected line.
    pub(super) fn transmit(&mut self, byte: u8) {
        let _ = self.out.write_all(&[byte]).and_then(|()| self.out.flush());
    }

    /// Sets the interrupt line to `level`, raising an edge if it went high.
    pub(super) fn set_line(&mut self, level: bool) {
        if level && !self.line {
            // An eventfd write fails only when its counter would overflow,
            // that is with an edge already pending.
            let _ = self.irq.trigger();
        }
        self.line = level;
    }

    /// The interrupt line's level.
    pub(super) fn line(&self) -> bool {
        self.line
    }

    /// The output sink.
    pub(super) fn out_mut(&mut self) -> &mut W {
        &mut self.out
    }
}
