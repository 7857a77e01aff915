//! Legacy PC devices for a firmware-less Linux boot: 16550 UARTs, the i8042
//! reset line, the few motherboard ports Linux probes, and the ACPI power
//! device's ports.

#[cfg(any(test, feature = "test-util"))]
pub mod linux8250;
mod misc;
mod serial;

pub use misc::{Cmos, PowerPorts};
pub use serial::{EventFdTrigger, SerialPort, I8042};

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
