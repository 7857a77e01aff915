//! The port-I/O bus: dispatches guest `in`/`out` to the device owning the port.

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device on the port-I/O bus. Offsets are relative to the device's base.
pub trait PioDevice: Send {
    /// Guest `in` from `base + offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Guest `out` to `base + offset`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors inserting a device.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// The range is empty or overlaps a device already on the bus.
    #[error("Port range {base:#x}+{len} overlaps another device or is empty")]
    Overlap {
        /// First port.
        base: u16,
        /// Number of ports.
        len: u16,
    },
}

struct Entry {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Port-I/O bus. Reads from ports nobody owns return all ones, as on an
/// ISA bus with nothing driving it; writes to them are dropped.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<Entry>,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at ports `base..base + len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), Error> {
        let end = u32::from(base) + u32::from(len);
        let overlaps = self.entries.iter().any(|e| {
            u32::from(base) < u32::from(e.base) + u32::from(e.len) && u32::from(e.base) < end
        });
        if len == 0 || overlaps || end > 0x1_0000 {
            return Err(Error::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Entry, u16)> {
        self.entries
            .iter()
            .find(|e| port >= e.base && u32::from(port) < u32::from(e.base) + u32::from(e.len))
            .map(|e| (e, port - e.base))
    }

    /// Handles a guest `in`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((e, offset)) => lock(&e.device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Handles a guest `out`.
    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some((e, offset)) = self.find(port) {
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
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xee));
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_port_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fd, &mut b);
        assert_eq!(b, [5]);
        bus.write(0x3f8, b"x");
        assert_eq!(lock(&dev).writes, vec![(0, b"x".to_vec())]);
    }

    #[test]
    fn unclaimed_ports_float_high() {
        let bus = PioBus::new();
        let mut b = [0u8; 4];
        bus.read(0xcfc, &mut b);
        assert_eq!(b, [0xff; 4]);
        bus.write(0x80, &[1]);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = PioBus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x60, 1, d()).unwrap();
        bus.insert(0x64, 1, d()).unwrap();
        assert_eq!(
            bus.insert(0x5f, 2, d()),
            Err(Error::Overlap { base: 0x5f, len: 2 })
        );
        assert!(bus.insert(0xffff, 2, d()).is_err());
        assert!(bus.insert(0x70, 0, d()).is_err());
    }
}
