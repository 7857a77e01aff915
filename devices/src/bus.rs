//! A bus addressed by u64: dispatches a guest access to the device owning
//! the address. One type serves both port I/O (x86 `in`/`out`, addresses
//! below 64 KiB) and MMIO (arm64's devices are all MMIO), as Cloud
//! Hypervisor's vm-device `Bus` does; the VMM keeps one of each.

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device on a bus. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// Guest read (`in`, or a load) from `base + offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write (`out`, or a store) to `base + offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting a device.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// The range is empty, wraps, or overlaps a device already on the bus.
    #[error("Bus range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A bus. Reads from addresses nobody owns return all ones, as on an ISA
/// bus with nothing driving it; writes to them are dropped.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base + len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Error> {
        let Some(end) = base.checked_add(len).filter(|_| len > 0) else {
            return Err(Error::Overlap { base, len });
        };
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(Error::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        self.entries
            .iter()
            .find(|e| addr >= e.base && addr - e.base < e.len)
            .map(|e| (e, addr - e.base))
    }

    /// Handles a guest read.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((e, offset)) => lock(&e.device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Handles a guest write.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((e, offset)) = self.find(addr) {
            lock(&e.device).write(offset, data);
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose handler
/// panicked on one vCPU must not take the others down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xee));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_port_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fd, &mut b);
        assert_eq!(b, [5]);
        bus.write(0x3f8, b"x");
        assert_eq!(lock(&dev).writes, vec![(0, b"x".to_vec())]);
    }

    #[test]
    fn unclaimed_ports_float_high() {
        let bus = Bus::new();
        let mut b = [0u8; 4];
        bus.read(0xcfc, &mut b);
        assert_eq!(b, [0xff; 4]);
        bus.write(0x80, &[1]);
    }

    #[test]
    fn mmio_addresses_above_4_gib_dispatch() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x1_0900_0000, 0x1000, dev.clone()).unwrap();
        let mut b = [0u8; 4];
        bus.read(0x1_0900_0018, &mut b);
        assert_eq!(b, [0x18; 4]);
        bus.write(0x1_0900_0fff, &[7]);
        assert_eq!(lock(&dev).writes, vec![(0xfff, vec![7])]);
        bus.read(0x1_0900_1000, &mut b);
        assert_eq!(b, [0xff; 4], "one past the end is nobody's");
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x60, 1, d()).unwrap();
        bus.insert(0x64, 1, d()).unwrap();
        assert_eq!(
            bus.insert(0x5f, 2, d()),
            Err(Error::Overlap { base: 0x5f, len: 2 })
        );
        assert!(bus.insert(u64::MAX, 2, d()).is_err(), "wraps");
        assert!(bus.insert(0x70, 0, d()).is_err());
    }
}
