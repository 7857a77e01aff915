//! Motherboard ports Linux touches during boot.

use crate::bus::PioDevice;

/// CMOS/RTC index and data ports (0x70, 0x71), unbacked. Reads return zero
/// so "update in progress" is never set; kvm-clock gives the guest its time.
pub struct Cmos;

impl PioDevice for Cmos {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u16, _data: &[u8]) {}
}
