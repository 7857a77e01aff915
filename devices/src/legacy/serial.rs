//! 16550A UARTs and the i8042 controller, from vm-superio, on the PIO bus.

use std::io::{self, Write};

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::PioDevice;

/// The 16550A receive FIFO's size (vm-superio's, which does not export it).
const FIFO_SIZE: usize = 64;

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

/// A 16550A UART whose transmitted bytes go to `W`.
pub struct SerialPort<W: Write + Send> {
    inner: Serial<EventFdTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> SerialPort<W> {
    /// A UART raising its interrupt through `irq` and writing output to `out`.
    pub fn new(irq: EventFd, out: W) -> Self {
        Self {
            inner: Serial::new(EventFdTrigger::new(irq), out),
        }
    }

    /// Queues bytes for the guest to read, as many as the receive FIFO has
    /// room for; returns how many were queued.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        let room = self.inner.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        self.inner.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }

    /// Whether received bytes wait in the FIFO for the guest.
    pub fn rx_waiting(&self) -> bool {
        self.inner.fifo_capacity() < FIFO_SIZE
    }

    /// The output sink.
    pub fn writer_mut(&mut self) -> &mut W {
        self.inner.writer_mut()
    }
}

impl<W: Write + Send> PioDevice for SerialPort<W> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // UART registers are 8 bits wide; wider accesses read the low one.
        let v = u8::try_from(offset).map_or(0xff, |o| self.inner.read(o));
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (Ok(o), Some(b)) = (u8::try_from(offset), data.first()) {
            // An output sink error (a closed console file) must not stop the
            // guest; the byte is lost as on a disconnected line.
            let _ = self.inner.write(o, *b);
        }
    }
}

/// The i8042 controller, here for its CPU-reset command (0xfe to port 0x64),
/// which Linux uses with `reboot=k`, together with system control port B
/// (0x61) that sits inside its port range. Put it at 0x60 with length 5.
/// Like kvmtool and Cloud Hypervisor, port B reads with bit 5 set so that
/// `pit_calibrate_tsc()` does not spin waiting for the PIT output to toggle.
pub struct I8042<T: Trigger> {
    inner: I8042Device<T>,
}

impl<T: Trigger> I8042<T> {
    /// A controller calling `reset` when the guest asks for a CPU reset.
    pub fn new(reset: T) -> Self {
        Self {
            inner: I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> PioDevice for I8042<T> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = match offset {
            0 | 4 => self.inner.read(u8::try_from(offset).unwrap_or(0)),
            1 => 0x20,
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (0 | 4, Some(b)) = (offset, data.first()) {
            let _ = self.inner.write(u8::try_from(offset).unwrap_or(0), *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::legacy::FnTrigger;

    #[test]
    fn uart_transmits_and_receives() {
        let irq = EventFd::new(libc_nonblock()).unwrap();
        let mut uart = SerialPort::new(irq.try_clone().unwrap(), Vec::new());
        // Enable the "data available" interrupt (IER bit 0).
        uart.write(1, &[1]);
        assert!(!uart.rx_waiting());
        assert_eq!(uart.enqueue(b"hi\n"), 3);
        assert!(uart.rx_waiting());
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8; 1];
        uart.read(0, &mut b);
        assert_eq!(b, [b'h']);
        uart.write(0, b"o");
        assert_eq!(uart.writer_mut().as_slice(), b"o");
    }

    #[test]
    fn uart_fifo_is_bounded() {
        let irq = EventFd::new(libc_nonblock()).unwrap();
        let mut uart = SerialPort::new(irq, Vec::new());
        let big = vec![b'x'; 1000];
        let n = uart.enqueue(&big);
        assert_eq!(n, 64);
        assert_eq!(uart.enqueue(&big), 0);
    }

    #[test]
    fn i8042_reset_command_fires() {
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let mut kbd = I8042::new(FnTrigger::new(move || f.store(true, Ordering::SeqCst)));
        let mut b = [0u8; 1];
        kbd.read(1, &mut b);
        assert_eq!(b, [0x20], "port B");
        kbd.write(4, &[0xfe]);
        assert!(fired.load(Ordering::SeqCst));
    }

    fn libc_nonblock() -> i32 {
        // EFD_NONBLOCK
        0o4000
    }
}
