//! Motherboard ports: the ones Linux touches during boot, and the ACPI
//! power device's.

use crate::bus::BusDevice;

/// CMOS/RTC index and data ports (0x70, 0x71), unbacked. Reads return zero
/// so "update in progress" is never set; kvm-clock gives the guest its time.
pub struct Cmos;

impl BusDevice for Cmos {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// The ACPI power device's ports (sleep control, sleep status, reset; see
/// arch's FADT). Reads return zero (no wake status); each byte written is
/// handed to `on_write` with its offset, which decides what it means.
pub struct PowerPorts {
    on_write: Box<dyn Fn(u16, u8) + Send>,
}

impl PowerPorts {
    /// Ports whose writes go to `on_write(offset, value)`.
    pub fn new(on_write: impl Fn(u16, u8) + Send + 'static) -> Self {
        Self {
            on_write: Box::new(on_write),
        }
    }
}

impl BusDevice for PowerPorts {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        // Port accesses are 1, 2 or 4 bytes wide, within a port window.
        let Ok(offset) = u16::try_from(offset) else {
            return;
        };
        for (i, b) in (0u16..).zip(data) {
            (self.on_write)(offset.wrapping_add(i), *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn power_ports_forward_each_byte() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut p = PowerPorts::new(move |o, v| s.lock().unwrap().push((o, v)));
        p.write(0, &[0x34]);
        p.write(1, &[0x80, 0x01]);
        let mut b = [0xffu8; 2];
        p.read(1, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(*seen.lock().unwrap(), vec![(0, 0x34), (1, 0x80), (2, 0x01)]);
    }
}
