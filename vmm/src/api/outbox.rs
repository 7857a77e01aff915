//! Where answers and events wait for a connection's writer: a bounded
//! queue per connection ([`Outbox`]), the handle the session answers
//! through ([`Reply`]), and the fan-out of events to subscribers ([`Hub`]).
//!
//! Nothing here blocks the session: a line either fits the connection's
//! budget or the connection is dropped.

use std::collections::VecDeque;
use std::fmt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::Answer;

/// The connection a line was for is gone (closed, or dropped for not
/// reading); the session forgets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("API connection closed")]
pub struct Dropped;

/// Why an outbox stopped taking lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The connection is ending in order: what is queued is still written.
    Finished,
    /// The client left lines unread past the budget.
    Overflow,
    /// The socket failed or the client left; what is queued is dropped.
    Broken,
}

#[derive(Debug, Default)]
struct State {
    lines: VecDeque<String>,
    bytes: usize,
    closed: Option<Closed>,
    /// The request whose answer the connection waits for.
    awaiting: Option<u64>,
    next_seq: u64,
    /// The writer is writing a line it took (it may be blocked in it).
    writing: bool,
}

/// A connection's outgoing lines, bounded in lines and bytes.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    changed: Condvar,
    max_lines: usize,
    max_bytes: usize,
    /// Shut down for reading when the outbox breaks, to stop the reader.
    socket: Option<UnixStream>,
}

/// How waiting for an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The answer is queued.
    Answered,
    /// Every reply handle went without an answer (the run is over).
    Unanswered,
    /// The deadline passed.
    TimedOut,
    /// The outbox closed, or `hung_up` said the client left.
    Gone,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How often a waiting connection checks whether its client left.
const HANGUP_POLL: Duration = Duration::from_millis(200);

impl Outbox {
    /// An empty outbox holding at most `max_lines` lines and `max_bytes`
    /// bytes (one line of any size fits when it is empty); `socket` is shut
    /// down for reading when it breaks.
    pub fn new(max_lines: usize, max_bytes: usize, socket: Option<UnixStream>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            max_lines,
            max_bytes,
            socket,
        })
    }

    /// Queues a line; `answers` names the request it answers, if any. Over
    /// the budget the outbox closes with [`Closed::Overflow`].
    pub fn push(&self, line: String, answers: Option<u64>) -> Result<(), Dropped> {
        let mut s = locked(&self.state);
        if s.closed.is_some() {
            return Err(Dropped);
        }
        let full =
            s.lines.len() >= self.max_lines || s.bytes.saturating_add(line.len()) > self.max_bytes;
        if full && !s.lines.is_empty() {
            drop(s);
            self.close(Closed::Overflow);
            return Err(Dropped);
        }
        s.bytes += line.len();
        s.lines.push_back(line);
        if answers.is_some() && s.awaiting == answers {
            s.awaiting = None;
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Stops taking lines; the first reason stays. Unless the connection
    /// is finishing in order, what is queued is dropped and the socket shut
    /// down at once (which stops the reader and a writer blocked in a
    /// write); a client dropped for not reading first gets one last error
    /// line, if the writer is between lines and the socket takes it at once.
    pub fn close(&self, why: Closed) {
        let mut s = locked(&self.state);
        if s.closed.is_some() {
            return;
        }
        s.closed = Some(why);
        if why != Closed::Finished {
            s.lines.clear();
            s.bytes = 0;
            if let Some(sock) = &self.socket {
                if why == Closed::Overflow && !s.writing {
                    let last = Answer::err(0, "too many unread answers and events; closing");
                    // SAFETY: send reads `last.len()` bytes from a live
                    // String; MSG_DONTWAIT never blocks, MSG_NOSIGNAL
                    // raises no SIGPIPE. The state lock keeps the writer
                    // from starting a line meanwhile.
                    let _ = unsafe {
                        libc::send(
                            sock.as_raw_fd(),
                            last.as_ptr().cast(),
                            last.len(),
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        )
                    };
                }
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
        }
        self.changed.notify_all();
    }

    /// Why the outbox closed, if it did.
    pub fn closed(&self) -> Option<Closed> {
        locked(&self.state).closed
    }

    /// Lines and bytes waiting.
    pub fn queued(&self) -> (usize, usize) {
        let s = locked(&self.state);
        (s.lines.len(), s.bytes)
    }

    /// The next line to write, waiting for one; `None` once closed (after
    /// the queue drains when finishing in order).
    pub fn next_line(&self) -> Option<String> {
        let mut s = locked(&self.state);
        s.writing = false;
        loop {
            if let Some(l) = s.lines.pop_front() {
                s.bytes -= l.len();
                s.writing = true;
                return Some(l);
            }
            if s.closed.is_some() {
                return None;
            }
            s = self
                .changed
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// A reply handle for one request; the connection waits for it with
    /// [`Outbox::wait_answer`].
    pub fn reply(self: &Arc<Self>) -> Reply {
        let mut s = locked(&self.state);
        let seq = s.next_seq;
        s.next_seq += 1;
        s.awaiting = Some(seq);
        Reply {
            to: To::Conn {
                outbox: self.clone(),
                seq,
            },
            live: Arc::new(()),
        }
    }

    /// Waits until `reply`'s answer is queued, until `until`, until every
    /// clone of `reply` is dropped unanswered, or until the connection goes.
    pub fn wait_answer(&self, reply: Reply, until: Instant, hung_up: impl Fn() -> bool) -> Waited {
        let seq = match &reply.to {
            To::Conn { seq, .. } => *seq,
            To::Hub(_) => return Waited::Gone,
        };
        let live = reply.live.clone();
        drop(reply);
        let mut s = locked(&self.state);
        loop {
            if s.closed.is_some() {
                return Waited::Gone;
            }
            if s.awaiting != Some(seq) {
                return Waited::Answered;
            }
            if Arc::strong_count(&live) == 1 {
                s.awaiting = None;
                return Waited::Unanswered;
            }
            let now = Instant::now();
            if now >= until {
                // A late answer is still written, but waited for no more.
                s.awaiting = None;
                return Waited::TimedOut;
            }
            let slice = (until - now).min(HANGUP_POLL);
            s = self
                .changed
                .wait_timeout(s, slice)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            if s.awaiting == Some(seq) && hung_up() {
                s.awaiting = None;
                return Waited::Gone;
            }
        }
    }

    fn wake(&self) {
        let _s = locked(&self.state);
        self.changed.notify_all();
    }
}

#[derive(Clone)]
enum To {
    Conn { outbox: Arc<Outbox>, seq: u64 },
    Hub(Arc<Hub>),
}

/// Where the session sends a request's answer and, for subscribers, event
/// lines: bounded and never blocking. `send` fails once the connection is
/// gone, and the session then forgets the handle.
#[derive(Clone)]
pub struct Reply {
    to: To,
    /// Counts live handles for one request, so the connection learns when
    /// all went unanswered.
    live: Arc<()>,
}

impl Reply {
    /// Queues `line` for the connection.
    pub fn send(&self, line: String) -> Result<(), Dropped> {
        match &self.to {
            To::Conn { outbox, seq } => outbox.push(line, Some(*seq)),
            To::Hub(hub) => {
                hub.deliver(line);
                Ok(())
            }
        }
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.to {
            To::Conn { seq, .. } => write!(f, "Reply(request {seq})"),
            To::Hub(_) => write!(f, "Reply(subscribers)"),
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        match &self.to {
            To::Conn { outbox, .. } => outbox.wake(),
            To::Hub(hub) => hub.wake(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Registration {
    /// The session has no subscriber for us.
    None,
    /// A subscribe request is on its way to the session.
    Pending,
    /// The session sends every event to the hub.
    Ready,
    /// The session said no.
    Refused(String),
}

#[derive(Debug)]
struct HubState {
    registration: Registration,
    subscribers: Vec<(u64, Arc<Outbox>)>,
}

/// The session's one event subscriber: it copies each event line into the
/// outbox of every subscribed connection. Connections subscribe and leave
/// here, at once, so a client that subscribes and disconnects holds no slot
/// in the session until the next event.
#[derive(Debug)]
pub struct Hub {
    state: Mutex<HubState>,
    changed: Condvar,
    max: usize,
    /// Counts live reply handles held by the session.
    live: Arc<()>,
}

impl Hub {
    /// A hub for at most `max` subscribers.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(HubState {
                registration: Registration::None,
                subscribers: Vec::new(),
            }),
            changed: Condvar::new(),
            max,
            live: Arc::new(()),
        })
    }

    /// Subscribes connection `id`: registers the hub with the session first
    /// if needed (`register` sends the session a subscribe request answered
    /// through the given handle; false if it could not be sent), waiting
    /// until `until`. The error is what to tell the client.
    pub fn subscribe(
        self: &Arc<Self>,
        id: u64,
        outbox: &Arc<Outbox>,
        until: Instant,
        register: impl FnOnce(Reply) -> bool,
    ) -> Result<(), String> {
        let mut register = Some(register);
        let mut s = locked(&self.state);
        if s.subscribers.iter().any(|(i, _)| *i == id) {
            return Ok(());
        }
        if s.subscribers.len() >= self.max {
            return Err(format!("too many subscribers (at most {})", self.max));
        }
        loop {
            match s.registration.clone() {
                Registration::Ready => {
                    s.subscribers.push((id, outbox.clone()));
                    return Ok(());
                }
                Registration::Refused(e) => {
                    s.registration = Registration::None;
                    return Err(e);
                }
                Registration::None => {
                    let Some(register) = register.take() else {
                        return Err("the run is over".into());
                    };
                    s.registration = Registration::Pending;
                    drop(s);
                    let sent = register(Reply {
                        to: To::Hub(self.clone()),
                        live: self.live.clone(),
                    });
                    s = locked(&self.state);
                    if !sent {
                        s.registration = Registration::None;
                        return Err("the run is over".into());
                    }
                }
                Registration::Pending => {
                    if Arc::strong_count(&self.live) == 1 {
                        // The request went unanswered: the session is gone.
                        s.registration = Registration::None;
                        return Err("the run is over".into());
                    }
                    let now = Instant::now();
                    if now >= until {
                        // Still pending: a later subscriber finds it ready.
                        return Err("the session did not take the subscription in time".into());
                    }
                    s = self
                        .changed
                        .wait_timeout(s, until - now)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
    }

    /// Forgets connection `id`.
    pub fn unsubscribe(&self, id: u64) {
        locked(&self.state).subscribers.retain(|(i, _)| *i != id);
    }

    /// Subscribed connections.
    pub fn subscribers(&self) -> usize {
        locked(&self.state).subscribers.len()
    }

    /// A line from the session: the answer to the hub's own subscribe
    /// request first, then events, copied to every subscriber; one that
    /// cannot take it is dropped.
    fn deliver(&self, line: String) {
        let mut s = locked(&self.state);
        if s.registration == Registration::Pending {
            s.registration = match serde_json::from_str::<Answer>(&line) {
                Ok(Answer { error: None, .. }) => Registration::Ready,
                Ok(Answer { error: Some(e), .. }) => Registration::Refused(e),
                Err(e) => Registration::Refused(format!("unexpected answer: {e}")),
            };
            self.changed.notify_all();
            return;
        }
        s.subscribers
            .retain(|(_, o)| o.push(line.clone(), None).is_ok());
    }

    fn wake(&self) {
        let _s = locked(&self.state);
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_drops_a_client_that_does_not_read() {
        let o = Outbox::new(4, 1 << 20, None);
        for i in 0..4 {
            o.push(format!("{i}\n"), None).unwrap();
        }
        assert_eq!(o.push("4\n".into(), None), Err(Dropped));
        assert_eq!(o.closed(), Some(Closed::Overflow));
        assert_eq!(o.queued(), (0, 0), "dropped lines are freed");
        let o = Outbox::new(100, 10, None);
        // One line larger than the budget fits an empty queue.
        o.push("0123456789abcdef\n".into(), None).unwrap();
        assert_eq!(o.push("x\n".into(), None), Err(Dropped));
    }

    #[test]
    fn overflow_sends_one_last_line_and_closes_the_socket() {
        use std::io::Read;
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let o = Outbox::new(2, 1 << 20, Some(ours));
        o.push("a\n".into(), None).unwrap();
        o.push("b\n".into(), None).unwrap();
        assert_eq!(o.push("c\n".into(), None), Err(Dropped));
        let mut got = String::new();
        theirs.read_to_string(&mut got).unwrap();
        // Queued lines are dropped; the client learns why, then EOF.
        assert_eq!(
            got,
            "{\"id\":0,\"error\":\"too many unread answers and events; closing\"}\n"
        );
        assert_eq!(o.next_line(), None);
    }

    #[test]
    fn answers_are_waited_for_and_unanswered_requests_noticed() {
        let o = Outbox::new(16, 1 << 20, None);
        let r = o.reply();
        let session = r.clone();
        let t = std::thread::spawn(move || session.send("answer\n".into()));
        let far = Instant::now() + Duration::from_secs(10);
        assert_eq!(o.wait_answer(r, far, || false), Waited::Answered);
        t.join().unwrap().unwrap();
        assert_eq!(o.next_line().as_deref(), Some("answer\n"));
        // The session drops the handle without answering.
        let r = o.reply();
        let session = r.clone();
        let t = std::thread::spawn(move || drop(session));
        assert_eq!(o.wait_answer(r, far, || false), Waited::Unanswered);
        t.join().unwrap();
        // Nobody answers in time; the late answer is still queued.
        let r = o.reply();
        let late = r.clone();
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(o.wait_answer(r, soon, || false), Waited::TimedOut);
        late.send("late\n".into()).unwrap();
        assert_eq!(o.next_line().as_deref(), Some("late\n"));
        // The client hangs up while waiting.
        let r = o.reply();
        let _held = r.clone();
        assert_eq!(o.wait_answer(r, far, || true), Waited::Gone);
    }

    #[test]
    fn hub_registers_once_and_fans_out() {
        let hub = Hub::new(2);
        let (a, b, c) = (
            Outbox::new(16, 1 << 20, None),
            Outbox::new(1, 1 << 20, None),
            Outbox::new(16, 1 << 20, None),
        );
        let far = Instant::now() + Duration::from_secs(10);
        let held = Arc::new(Mutex::new(None));
        let h = held.clone();
        hub.subscribe(1, &a, far, move |r| {
            r.send(Answer::ok(0, serde_json::Value::Null)).unwrap();
            *h.lock().unwrap() = Some(r);
            true
        })
        .unwrap();
        hub.subscribe(2, &b, far, |_| panic!("registered twice"))
            .unwrap();
        assert!(hub.subscribe(3, &c, far, |_| true).is_err(), "at most 2");
        let session = held.lock().unwrap().take().unwrap();
        session.send("{\"event\":1}\n".into()).unwrap();
        session.send("{\"event\":2}\n".into()).unwrap();
        assert_eq!(a.queued().0, 2);
        assert_eq!(b.closed(), Some(Closed::Overflow), "b holds one line");
        assert_eq!(hub.subscribers(), 1);
        hub.unsubscribe(1);
        assert_eq!(hub.subscribers(), 0);
        hub.subscribe(3, &c, far, |_| panic!("still registered"))
            .unwrap();
    }
}
