//! The control API's requests, served on the session's thread.
//!
//! The socket and its connections are [`crate::api`]'s; this is what each
//! request does to the run: steps, raw machine-check records, the ledger,
//! the KHO view, the run's state, event subscriptions and shutdown.

use devices::bus::lock;
use guest_agent::encode;
use ras::mce::MceRecord;

use crate::api::{Answer, ApiCall, Request};
use crate::session::Session;
use crate::steps::{self, Step};

impl Session {
    /// Serves one control API request.
    pub(crate) fn serve_api(&mut self, call: ApiCall) {
        let ApiCall {
            envelope,
            reply,
            received,
        } = call;
        let id = envelope.id;
        let answer = match envelope.request {
            Request::Step(text) => match steps::parse(&text) {
                Err(e) => Answer::err(id, e),
                Ok(Step::Wait(_)) => Answer::err(id, "wait is the client's to do over the API"),
                Ok(Step::WaitConsole(_)) => {
                    Answer::err(id, "wait-console is the client's to do over the API")
                }
                Ok(Step::WaitBoot(_)) => Answer::err(
                    id,
                    "wait-boot is the client's to do over the API (see state's boot)",
                ),
                Ok(Step::Agent { .. }) if !self.agent_up => Answer::err(
                    id,
                    "the guest agent is not ready yet (see state's agent_ready_ms)",
                ),
                Ok(Step::Agent { cmd, pfn, bind }) => match self.refs.resolve(&cmd, pfn.as_ref()) {
                    Err(e) => Answer::err(id, e),
                    Ok(cmd) => {
                        if cmd.reboots_into_next_kernel() {
                            self.vm.ras().kho_before_kexec(&mut self.kho);
                        }
                        let agent_id = self.next_id;
                        self.next_id += 1;
                        let l = encode(&guest_agent::Request {
                            id: agent_id,
                            cmd: cmd.clone(),
                        });
                        match lock(self.vm.agent()).send(&l) {
                            Err(e) => Answer::err(id, e),
                            Ok(()) => {
                                self.api_pending.insert(agent_id, (cmd, bind, id, reply));
                                return;
                            }
                        }
                    }
                },
                Ok(step) => match self.perform(&step, received) {
                    Ok(_) => Answer::ok(id, serde_json::Value::Null),
                    Err(e) => Answer::err(id, e),
                },
            },
            Request::Mce(raw) => {
                let record = MceRecord {
                    bank: raw.bank,
                    status: raw.status,
                    addr: raw.addr,
                    misc: raw.misc,
                    mcg_status: raw.mcg_status,
                };
                match self.vm.ras().inject_record(raw.vcpu, &record, received) {
                    Ok(event) => {
                        self.record(event);
                        Answer::ok(id, serde_json::Value::Null)
                    }
                    Err(e) => Answer::err(id, e),
                }
            }
            Request::Ledger => Answer::ok(
                id,
                serde_json::to_value(self.vm.ras().ledger()).unwrap_or_default(),
            ),
            Request::Kho => Answer::ok(
                id,
                serde_json::to_value(self.vm.ras().kho_view(&self.kho)).unwrap_or_default(),
            ),
            Request::State => Answer::ok(
                id,
                serde_json::json!({
                    "elapsed_ms": self.vm.ras().now_ms(),
                    "agent_ready_ms": self.hello.as_ref().map(|(_, d)| d.as_millis()),
                    "boot": self.boot(),
                    "guest_kernel": self.hello.as_ref().map(|(h, _)| h.kernel.clone()),
                    "outcome": self.outcome.as_ref().map(|o| o.kind),
                    "mcg_cap": self.vm.ras().mcg_cap().0,
                    "mcg_cap_supplied": self.vm.ras().mcg_cap().1,
                    "ghes_sources": self.vm.ras().ghes_state(),
                    "ras_limitation": self.vm.ras().ras_limitation(),
                    "poisoned_pages": self.vm.ras().poisoned_pages(),
                    "ras_events": self.ras_events.len(),
                    "signals": self.signals.len(),
                }),
            ),
            Request::Subscribe => {
                if self.subscribers.len() < 16 {
                    self.subscribers.push(reply.clone());
                    Answer::ok(id, serde_json::Value::Null)
                } else {
                    Answer::err(id, "too many subscribers")
                }
            }
            Request::Shutdown => {
                let _ = reply.send(Answer::ok(id, serde_json::Value::Null));
                let o = self
                    .classifier
                    .stopped("shutdown requested over the control API".into());
                self.finish(o);
                return;
            }
        };
        let _ = reply.send(answer);
    }
}
