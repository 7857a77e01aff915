//! Legacy devices for a firmware-less Linux boot: 16550 UARTs (x86), PL011
//! UARTs (arm64), the i8042 reset line, the few motherboard ports Linux
//! probes, and the ACPI power device's ports.
//!
//! Both UARTs present the same host-side API, the [`Uart`] trait, so the
//! VMM's console and agent ports are generic over the guest's UART.

#[cfg(any(test, feature = "test-util"))]
pub mod linux8250;
mod misc;
mod pl011;
mod serial;
mod uart;

pub use misc::{Cmos, PowerPorts};
pub use pl011::Pl011;
pub use serial::{SerialPort, I8042};
pub use uart::EventFdTrigger;

use std::io::Write;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// A UART as the VMM drives it from the host side: bytes in through
/// [`Uart::enqueue`], bytes out to the sink `W`, the interrupt through the
/// eventfd given at construction (an edge on each rise of the line).
pub trait Uart<W: Write + Send>: BusDevice {
    /// A UART raising its interrupt through `irq` and writing output to
    /// `out`.
    fn new(irq: EventFd, out: W) -> Self
    where
        Self: Sized;
    /// Queues bytes for the guest, as many as the receive FIFO has room
    /// for; returns how many were queued.
    fn enqueue(&mut self, bytes: &[u8]) -> usize;
    /// Whether received bytes wait in the FIFO for the guest.
    fn rx_waiting(&self) -> bool;
    /// Whether the interrupt line is asserted.
    fn irq_asserted(&self) -> bool;
    /// The output sink.
    fn writer_mut(&mut self) -> &mut W;
}

use vm_superio::Trigger;

/// A trigger that calls a closure: used where an event is not an interrupt
/// but a message to the VMM (the i8042 reset line).
pub struct FnTrigger(Box<dyn Fn() + Send>);

impl FnTrigger {
    /// Wraps `f`.
    pub fn new(f: impl Fn() + Send + 'static) -> Self {
        Self(Box::new(f))
    }
}

impl Trigger for FnTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}
