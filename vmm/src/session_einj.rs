//! The session's side of ACPI EINJ: a request the guest wrote into the EINJ
//! window is carried out by the RAS controller, recorded (the request, its
//! answer and what it reported or poisoned), and answered, which ends the
//! guest's wait on the busy bit.

use devices::bus::lock;
use ras::einj::Operation;

use crate::session::Session;

impl Session {
    /// Answers the guest's EINJ request.
    pub(crate) fn guest_einj(&mut self, op: Operation) {
        let answer = self.vm.ras().guest_einj(&op.request);
        // Recorded before the guest can read the status and go on.
        self.record(answer.event);
        if let Some(effect) = answer.effect {
            self.record_ghes(effect);
        }
        if let Some(einj) = self.vm.einj() {
            lock(einj).complete(op.id, answer.status);
        }
    }

    /// Records an EINJ request the old boot made that the guest's reset
    /// cut off before rasvmm answered it: nothing was done.
    pub(crate) fn einj_cut_off(&mut self, op: Operation) {
        let event = self.vm.ras().einj_cut_off(&op.request);
        self.record(event);
    }
}
