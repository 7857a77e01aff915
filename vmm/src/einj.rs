//! The EINJ device: [`ras::einj`]'s register window on the MMIO bus, where
//! the guest's ACPI error-injection requests arrive (docs/einj.md).
//!
//! A vCPU thread only moves bytes: an EXECUTE_OPERATION the guest writes
//! becomes a [`VmEvent::Einj`] for the session and sets the busy bit, which
//! the guest polls (CHECK_BUSY_STATUS); the session has the RAS controller
//! act on it and answers through [`EinjDevice::complete`], and the guest
//! then reads the command status.

use devices::bus::BusDevice;
use ras::einj::{CommandStatus, Window};

use crate::event::{EventSender, VmEvent};

/// The EINJ register window of one boot.
pub struct EinjDevice {
    window: Window,
    tx: EventSender,
}

impl EinjDevice {
    /// A window at guest-physical `base` whose requests go to `tx`.
    pub fn new(base: u64, tx: EventSender) -> Self {
        Self {
            window: Window::new(base),
            tx,
        }
    }

    /// Answers operation `id` (nothing, if the guest abandoned it).
    pub fn complete(&mut self, id: u64, status: CommandStatus) {
        self.window.complete(id, status);
    }
}

impl BusDevice for EinjDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.window.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(op) = self.window.write(offset, data) {
            if self.tx.send(VmEvent::Einj(op)).is_err() {
                // No session to act on it (the run is ending).
                self.window.complete(op.id, CommandStatus::UnknownFailure);
            }
        }
    }
}
