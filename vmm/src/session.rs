//! The session: the one thread that watches a running VM.
//!
//! Everything the guest or a vCPU does that matters arrives as a
//! [`VmEvent`] on one channel; [`Session`] consumes it, talks to the guest
//! agent, performs steps, serves the control API (in the `session_api`
//! module) and classifies the outcome. The run's state lives
//! here and only here. A guest reset under `--on-reboot restart` starts
//! the next boot in the same session (the `reboot` module).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use devices::bus::lock;
use guest_agent::{
    decode_agent_message, encode, AgentMessage, Command, GuestPoisonOp, Hello, KernelFeature,
    Payload, Request, SignalReport,
};

use crate::event::{RasEvent, VcpuStop, VmEvent};
use crate::event_loop::{EventLoop, Woke};
use crate::ghes_sources;
use crate::kho_observer::KhoTracker;
use crate::outcome::{Classifier, ConsoleHistory, Outcome, OutcomeKind};
#[allow(unused_imports)] // named in docs
use crate::ras_controller::RasController;
use crate::ras_controller::{GhesInjection, Injection, RasError};
use crate::report::{BootLog, StepReply};
use crate::steps::{Refs, Step, StepError};
use crate::vm::Vm;

/// Drives a started VM to its outcome.
pub struct Session {
    /// Waits for the VM's events (event-manager over the queue's eventfd
    /// and the GHES timer).
    event_loop: EventLoop,
    pub(crate) vm: Vm,
    pub(crate) classifier: Classifier,
    /// Every console line, bounded, for the verdict.
    pub(crate) console: ConsoleHistory,
    pub(crate) deadline: Instant,
    pub(crate) outcome: Option<Outcome>,
    pub(crate) hello: Option<(Hello, Duration)>,
    /// What the running kernel offers, by its agent's latest hello (after a
    /// kexec, the new kernel's), sorted, without repeats.
    pub(crate) features: Option<Vec<KernelFeature>>,
    /// Whether the agent is up now (false from a kexec until the new
    /// kernel's agent says hello).
    pub(crate) agent_up: bool,
    /// Guest kexecs so far.
    pub(crate) kexecs: u32,
    /// The boots that ended, and the current one's facts.
    pub(crate) boots: BootLog,
    pub(crate) next_id: u64,
    /// Signals the agent reported.
    pub signals: Vec<SignalReport>,
    /// When each of `signals` arrived, ms from VMM start.
    pub signal_ms: Vec<u64>,
    /// Lines from the agent that were rejected.
    pub agent_errors: Vec<String>,
    /// RAS events: poisonings, injections, consumptions.
    pub ras_events: Vec<RasEvent>,
    /// Pages the guest reported, by name (shared by steps and the API).
    pub refs: Refs,
    /// API connections that subscribed to events.
    pub(crate) subscribers: Vec<crate::api::Reply>,
    /// Agent requests made for API clients: agent id -> (command, API id, connection).
    pub(crate) api_pending: BTreeMap<u64, (Command, Option<String>, u64, crate::api::Reply)>,
    /// Addresses reported through GHES, to check the guest's decode against.
    pub(crate) ghes_addresses: BTreeSet<u64>,
    /// The running kernel's KHO root, pinned at each agent hello.
    pub(crate) kho: KhoTracker,
}

/// How often records waiting for a GHES acknowledgement are looked at.
const GHES_PUMP_INTERVAL: Duration = Duration::from_millis(2);

/// Most RAS events one run records (later ones are counted, not kept).
pub(crate) const MAX_RAS_EVENTS: usize = 10_000;

impl Session {
    /// Watches `vm` until its configured deadline.
    pub fn new(vm: Vm) -> Result<Self, crate::event_loop::Error> {
        let deadline = vm.started() + vm.config().timeout;
        let event_loop = EventLoop::new(vm.events().wake_fd())?;
        let mut classifier = Classifier::new();
        classifier.set_panic_reboots(vm.config().panic_is_reboot());
        Ok(Self {
            vm,
            event_loop,
            classifier,
            console: ConsoleHistory::default(),
            deadline,
            outcome: None,
            hello: None,
            features: None,
            agent_up: false,
            kexecs: 0,
            boots: BootLog::default(),
            next_id: 1,
            signals: Vec::new(),
            signal_ms: Vec::new(),
            agent_errors: Vec::new(),
            ras_events: Vec::new(),
            refs: Refs::default(),
            subscribers: Vec::new(),
            api_pending: BTreeMap::new(),
            ghes_addresses: BTreeSet::new(),
            kho: KhoTracker::new(),
        })
    }

    /// Whether API clients are listening for events.
    pub fn has_subscribers(&self) -> bool {
        !self.subscribers.is_empty()
    }

    /// Sends an event line to every subscriber, forgetting closed ones.
    pub(crate) fn publish<T: serde::Serialize>(&mut self, event: &T) {
        if self.subscribers.is_empty() {
            return;
        }
        let l = crate::api::line(&serde_json::json!({ "event": event }));
        self.subscribers.retain(|s| s.send(l.clone()).is_ok());
    }

    pub(crate) fn record(&mut self, e: RasEvent) {
        self.publish(&e);
        if self.ras_events.len() < MAX_RAS_EVENTS {
            self.ras_events.push(e);
        }
    }

    pub(crate) fn finish(&mut self, o: Outcome) {
        if self.outcome.is_none() {
            self.publish(&serde_json::json!({
                "event": "outcome",
                "outcome": o.kind,
                "detail": o.detail,
            }));
            self.outcome = Some(o);
        }
    }

    /// Performs one step that reached rasvmm at `received` (an injection's
    /// `vmm_us` starts there), resolving references; returns what agent
    /// and kho-scan steps read.
    pub fn perform(
        &mut self,
        step: &Step,
        received: Instant,
    ) -> Result<Option<StepReply>, StepError> {
        let failed = |e: RasError| StepError::Failed(e.to_string());
        match step {
            Step::Agent { cmd, pfn, bind } => {
                let cmd = self
                    .refs
                    .resolve(cmd, pfn.as_ref())
                    .map_err(StepError::Failed)?;
                let reply = self.call(cmd.clone())?;
                self.replied(&cmd, &reply, bind.as_deref())
                    .map_err(StepError::Failed)?;
                Ok(Some(StepReply::Agent(reply)))
            }
            Step::Inject {
                error,
                target,
                vcpu,
                local,
            } => {
                let inj = Injection {
                    error: *error,
                    gpa: self.refs.gpa(target).map_err(StepError::Failed)?,
                    vcpu: *vcpu,
                    local: *local,
                };
                self.inject(&inj, received).map_err(failed)?;
                Ok(None)
            }
            Step::Poison(target) => {
                let gpa = self.refs.gpa(target).map_err(StepError::Failed)?;
                self.poison(gpa).map_err(failed)?;
                Ok(None)
            }
            Step::GhesMemory {
                severity,
                target,
                source,
                threshold,
                vcpu,
            } => {
                let inj = GhesInjection {
                    source: *source,
                    severity: *severity,
                    gpa: self.refs.gpa(target).map_err(StepError::Failed)?,
                    threshold_exceeded: *threshold,
                    vcpu: *vcpu,
                };
                let e = self.vm.ras().ghes_memory_error(&inj).map_err(failed)?;
                self.record_ghes(e);
                Ok(None)
            }
            Step::GhesRaw { source, record } => {
                let e = self
                    .vm
                    .ras()
                    .ghes_raw(*source, record.clone(), 0)
                    .map_err(failed)?;
                self.record_ghes(e);
                Ok(None)
            }
            Step::GuestPoison { op, pages } => {
                let pfns = self.refs.pages(pages).map_err(StepError::Failed)?;
                if pfns.len() > guest_agent::MAX_KERNEL_PAGES as usize {
                    return Err(StepError::Failed(format!(
                        "{} pages named; at most {} at a time",
                        pfns.len(),
                        guest_agent::MAX_KERNEL_PAGES
                    )));
                }
                let reply = self.call(Command::GuestPoison {
                    op: *op,
                    pfns: pfns.clone(),
                })?;
                self.vm
                    .ras()
                    .note_guest_poison(*op, &pfns)
                    .map_err(failed)?;
                Ok(Some(StepReply::Agent(reply)))
            }
            Step::HostPoison(target) => {
                self.host_poison(target)?;
                Ok(None)
            }
            Step::KhoScan => Ok(Some(StepReply::Kho {
                kho: Box::new(self.vm.ras().kho_view(&self.kho)),
            })),
            Step::KhoCorrupt(edits) => {
                let c = self
                    .vm
                    .ras()
                    .kho_corrupt(&self.kho, edits)
                    .map_err(StepError::Failed)?;
                Ok(Some(StepReply::KhoCorrupt {
                    kho_corrupt: Box::new(c),
                }))
            }
            Step::Wait(d) => {
                self.wait(*d);
                Ok(None)
            }
            Step::WaitBoot(n) => self.wait_boot(*n).map(|()| None),
            Step::WaitConsole(t) => self.wait_console(t).map(|()| None),
            Step::When { feature, step } => match self.wait_agent().is_some() {
                false => Err(StepError::Ended),
                true if self.lacks(*feature) => Ok(Some(StepReply::NotOffered {
                    not_offered: *feature,
                })),
                // The wait for the agent is not rasvmm's share.
                true => self.perform(step, Instant::now()),
            },
        }
    }

    /// What an agent reply teaches: names for the pages it reports, and
    /// pages the guest poisoned itself for the ledger.
    fn replied(
        &mut self,
        cmd: &Command,
        reply: &Payload,
        bind: Option<&str>,
    ) -> Result<(), String> {
        self.refs.learn(cmd, reply, bind);
        match (cmd, reply) {
            (Command::KernelPages { poison: true, .. }, Payload::KernelPages(pfns)) => self
                .vm
                .ras()
                .note_guest_poison(GuestPoisonOp::Corrupt, pfns)
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }

    /// Lets the guest run for `d` (or until the run ends).
    pub fn wait(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while self.outcome.is_none() && Instant::now() < until {
            self.step_until(until);
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Time since the VMM started.
    pub fn elapsed(&self) -> Duration {
        self.vm.started().elapsed()
    }

    /// The agent's greeting and when it came, once it has.
    pub fn hello(&self) -> Option<&(Hello, Duration)> {
        self.hello.as_ref()
    }

    /// Whether the running kernel's agent said it lacks `f` (an agent that
    /// does not say lacks nothing known).
    pub fn lacks(&self, f: KernelFeature) -> bool {
        self.features
            .as_ref()
            .is_some_and(|have| !have.contains(&f))
    }

    /// Waits for the agent's hello (after a kexec, the new kernel's).
    /// `None` if the run ended first.
    pub fn wait_agent(&mut self) -> Option<&(Hello, Duration)> {
        while !self.agent_up && self.outcome.is_none() {
            self.step();
        }
        self.hello.as_ref().filter(|_| self.agent_up)
    }

    /// Guest kexecs so far.
    pub fn kexecs(&self) -> u32 {
        self.kexecs
    }

    /// The agent loaded the next kernel and is rebooting into it: wait for
    /// the new agent before any further request.
    pub(crate) fn guest_kexecs(&mut self) {
        self.agent_up = false;
        self.kexecs = self.kexecs.saturating_add(1);
        self.record(RasEvent::GuestKexec {
            kexecs: self.kexecs,
            at_ms: self.vm.ras().now_ms(),
        });
    }

    /// Sends `cmd` to the agent and waits for its reply.
    pub fn call(&mut self, cmd: Command) -> Result<Payload, StepError> {
        if self.wait_agent().is_none() {
            return Err(StepError::Ended);
        }
        let id = self.next_id;
        self.next_id += 1;
        let kexec = cmd.reboots_into_next_kernel();
        if kexec {
            // The roots present now are the old kernel's and its
            // processes': none of them is the next kernel's.
            self.vm.ras().kho_before_kexec(&mut self.kho);
        }
        let line = encode(&Request { id, cmd });
        if let Err(e) = lock(self.vm.agent()).send(&line) {
            return Err(StepError::Agent(e.to_string()));
        }
        let (boot, refused) = (self.boots.ended.len(), self.agent_errors.len());
        while self.outcome.is_none() {
            if self.boots.ended.len() != boot {
                // The agent that was asked is gone with its boot.
                return Err(StepError::Rebooted);
            }
            if let Some(e) = self.agent_errors.get(refused) {
                // Most likely the reply itself (too long, say): not waited
                // for until the deadline.
                return Err(StepError::Agent(format!("rasvmm refused its reply: {e}")));
            }
            if let Some(AgentMessage::Reply(r)) = self.step() {
                if r.id == id {
                    return match (r.ok, r.error) {
                        (Some(p), _) => {
                            if kexec {
                                self.guest_kexecs();
                            }
                            Ok(p)
                        }
                        (None, e) => Err(StepError::Agent(e.unwrap_or_default())),
                    };
                }
            }
        }
        Err(StepError::Ended)
    }

    /// Waits for the run to end and returns how.
    pub fn wait_outcome(&mut self) -> Outcome {
        loop {
            if let Some(o) = &self.outcome {
                return o.clone();
            }
            self.step();
        }
    }

    /// The next event: a queued one at once, else the first to arrive before
    /// `until`; `None` at `until`, or earlier when the GHES timer fires
    /// while records wait for an acknowledgement.
    fn next_event(
        &mut self,
        until: Instant,
        ghes_waiting: bool,
    ) -> Result<Option<VmEvent>, crate::event_loop::Error> {
        if let Ok(e) = self.vm.events().try_recv() {
            return Ok(Some(e));
        }
        if ghes_waiting {
            // Records wait for the guest's acknowledgement: look again soon.
            self.event_loop.arm_ghes(GHES_PUMP_INTERVAL)?;
        }
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let woke = self.event_loop.wait(left)?;
            if let Ok(e) = self.vm.events().try_recv() {
                return Ok(Some(e));
            }
            match woke {
                Woke::Ghes if ghes_waiting => return Ok(None),
                _ if Instant::now() >= until => return Ok(None),
                // A wake-up whose event an earlier step already took, or a
                // stale GHES tick: wait on.
                _ => {}
            }
        }
    }

    /// Handles one event (or the deadline); returns agent messages other
    /// than the hello to the caller.
    pub(crate) fn step(&mut self) -> Option<AgentMessage> {
        self.step_until(self.deadline)
    }

    /// Like [`Session::step`], but gives up quietly at `until` if that
    /// comes before the deadline.
    fn step_until(&mut self, until: Instant) -> Option<AgentMessage> {
        if self.outcome.is_some() {
            return None;
        }
        let until = until.min(self.deadline);
        let ghes_waiting = self.vm.ras().ghes_pump();
        let event = match self.next_event(until, ghes_waiting) {
            Ok(Some(e)) => e,
            Err(e) => {
                let o = self.classifier.vmm_error(crate::report::one_line(&e));
                self.finish(o);
                return None;
            }
            // Nothing yet, and records wait for the guest's acknowledgement:
            // the caller steps again, which pumps the GHES sources.
            Ok(None) if ghes_waiting && Instant::now() < until => return None,
            Ok(None) if until < self.deadline => return None,
            Ok(None) => {
                let secs = self.vm.config().timeout.as_secs_f64();
                let mut o = self.classifier.deadline(secs);
                if o.kind == OutcomeKind::Timeout {
                    // Where the guest was stuck, for diagnosis.
                    o.log.extend(
                        self.vm
                            .vcpu_states(Duration::from_millis(500), "at the deadline"),
                    );
                    let mut port = lock(self.vm.agent());
                    o.log.push(format!(
                        "rasvmm: agent UART at the deadline: {} guest reads, data waiting for the guest: {}",
                        port.reads(),
                        port.rx_waiting()
                    ));
                }
                self.finish(o);
                return None;
            }
        };
        match event {
            VmEvent::Console(line) => {
                if let Some(physical_addr) = ghes_sources::decoded_address(&line) {
                    let matches_report = self.ghes_addresses.contains(&physical_addr);
                    self.record(RasEvent::GuestDecoded {
                        physical_addr,
                        matches_report,
                    });
                }
                self.console.push(&line);
                if let Some(o) = self.classifier.console_line(&line) {
                    self.finish(o);
                }
            }
            VmEvent::Reset => self.guest_reset(),
            VmEvent::PowerOff => {
                let o = self.classifier.power_off("ACPI S5");
                self.finish(o);
            }
            VmEvent::Ras(e) => self.ras_event(e),
            VmEvent::HostMemoryError { code, hva } => self.host_report(code, hva, true),
            VmEvent::Api(call) => self.serve_api(call),
            VmEvent::Einj(op) => self.guest_einj(op),
            VmEvent::Stopped { vcpu, stop } => {
                let o = match stop {
                    VcpuStop::TripleFault(state) => self.classifier.triple_fault(vcpu, &state),
                    VcpuStop::SystemReset => {
                        self.guest_reset();
                        return None;
                    }
                    VcpuStop::MachineCheckShutdown(d) => {
                        self.machine_check_shutdown(format!("vCPU {vcpu}: {d}"));
                        return None;
                    }
                    VcpuStop::SystemShutdown => {
                        self.classifier.power_off("KVM_SYSTEM_EVENT_SHUTDOWN")
                    }
                    VcpuStop::Error(e) => self.classifier.vmm_error(format!("vCPU {vcpu}: {e}")),
                };
                let mut o = o;
                if matches!(o.kind, OutcomeKind::TripleFault | OutcomeKind::VmmError) {
                    // Where the other vCPUs were when this one stopped.
                    o.log.extend(
                        self.vm
                            .vcpu_states(Duration::from_millis(500), "when it stopped")
                            .into_iter()
                            .filter(|l| !l.starts_with(&format!("rasvmm: vCPU {vcpu} "))),
                    );
                }
                self.finish(o);
            }
            VmEvent::Agent(line) => match line.and_then(|l| decode_agent_message(&l)) {
                Ok(AgentMessage::Hello(h)) => {
                    self.features = h.features.clone().map(|mut f| {
                        f.sort();
                        f.dedup();
                        f
                    });
                    if self.hello.is_none() {
                        self.hello = Some((h, self.elapsed()));
                    }
                    if self.boots.agent_ms.is_none() {
                        self.boots.agent_ms = Some(self.vm.ras().now_ms());
                    }
                    let kexecs = self.kexecs.saturating_sub(self.boots.kexecs_at_start);
                    if !self.agent_up {
                        // A kernel is up, before any process the agent
                        // starts: pin the KHO root it published.
                        self.vm.ras().kho_hello(&mut self.kho, kexecs);
                    }
                    if !self.agent_up && kexecs > 0 {
                        // The kernel after a kexec is up: what does it
                        // believe is poisoned?
                        let view = self.vm.ras().kho_view(&self.kho);
                        self.record(RasEvent::KhoScanned {
                            after_kexec: self.kexecs,
                            view: Box::new(view),
                        });
                    }
                    self.agent_up = true;
                }
                Ok(AgentMessage::Signal(s)) => {
                    self.publish(&serde_json::json!({ "event": "signal", "signal": s }));
                    if self.signals.len() < MAX_RAS_EVENTS {
                        self.signals.push(s);
                        self.signal_ms.push(self.vm.ras().now_ms());
                    }
                }
                Ok(AgentMessage::Reply(r)) if self.api_pending.contains_key(&r.id) => {
                    if let Some((cmd, bind, api_id, conn)) = self.api_pending.remove(&r.id) {
                        let answer = match (r.ok, r.error) {
                            (Some(p), _) => {
                                if cmd.reboots_into_next_kernel() {
                                    self.guest_kexecs();
                                }
                                match self.replied(&cmd, &p, bind.as_deref()) {
                                    Ok(()) => crate::api::Answer::ok(
                                        api_id,
                                        serde_json::to_value(&p).unwrap_or_default(),
                                    ),
                                    Err(e) => crate::api::Answer::err(api_id, e),
                                }
                            }
                            (None, e) => crate::api::Answer::err(
                                api_id,
                                format!("agent: {}", e.unwrap_or_default()),
                            ),
                        };
                        let _ = conn.send(answer);
                    }
                }
                Ok(m) => return Some(m),
                Err(e) => {
                    if self.agent_errors.len() < 100 {
                        self.agent_errors.push(e.to_string());
                    }
                }
            },
        }
        None
    }
}
