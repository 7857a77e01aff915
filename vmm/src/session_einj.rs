//! The session's side of ACPI EINJ: a request the guest wrote into the EINJ
//! window is carried out by the RAS controller, recorded (the request, its
//! answer and what it reported or poisoned), and answered, which ends the
//! guest's wait on the busy bit.

use devices::bus::lock;
use ras::einj::Request;

use crate::session::Session;

impl Session {
    /// Answers the guest's EINJ request.
    pub(crate) fn guest_einj(&mut self, request: &Request) {
        let answer = self.vm.ras().guest_einj(request);
        // Recorded before the guest can read the status and go on.
        self.record(answer.event);
        if let Some(effect) = answer.effect {
            self.record_ghes(effect);
        }
        lock(self.vm.einj()).complete(answer.status);
    }
}
