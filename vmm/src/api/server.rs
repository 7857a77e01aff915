//! The control API's socket: created private, served one request at a time
//! per connection, every resource bounded ([`Limits`]).
//!
//! Each connection has a reader (this module's `connection`) and a writer
//! thread. The reader frames a line, hands the request to the session and
//! waits for its answer before reading the next, so the session's queue
//! holds at most one request per connection. The writer drains the
//! connection's [`Outbox`] with a send timeout.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::outbox::{Closed, Hub, Outbox, Waited};
use super::socket::{bind_private, peer_allowed, refuse};
use super::wire::{decode, Frame, Framer, MAX_LINE};
use super::{Answer, ApiCall, Envelope, Error, Request};

/// What one server allows; [`Limits::default`] is what `rasvmm run` uses
/// (docs/control-api.md, "Limits").
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections at once; more are answered with an error and closed.
    pub max_connections: usize,
    /// Subscribed connections at once.
    pub max_subscribers: usize,
    /// A connection that is not subscribed and completes no request for
    /// this long is closed.
    pub idle: Duration,
    /// A socket write that takes longer drops the connection.
    pub write_timeout: Duration,
    /// Longest wait for the session's answer to a request the VMM answers.
    pub answer_timeout: Duration,
    /// Longest wait for the answer to an agent request (the guest answers).
    pub agent_answer_timeout: Duration,
    /// Lines (answers and events) queued for one connection.
    pub queue_lines: usize,
    /// Bytes queued for one connection.
    pub queue_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            max_subscribers: 16,
            idle: Duration::from_secs(30),
            write_timeout: Duration::from_secs(5),
            answer_timeout: Duration::from_secs(60),
            agent_answer_timeout: Duration::from_secs(600),
            queue_lines: 1024,
            queue_bytes: 1 << 20,
        }
    }
}

/// Accept errors (EMFILE, ENOBUFS) are retried after a pause that doubles
/// from this...
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(1);
/// ...up to this.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// The listening socket; removes its file when dropped (if it is still the
/// one this server made).
pub struct Server {
    path: PathBuf,
    /// Device and inode of the socket file.
    id: Option<(u64, u64)>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| Some((m.dev(), m.ino())) == self.id)
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates the socket (0600, private from creation) and serves connections
/// with the default [`Limits`], forwarding each request to the session on
/// `events` (the session's event type says how it wraps an [`ApiCall`]; the
/// API names no session type).
pub fn serve<S: Submit>(path: &Path, events: S) -> Result<Server, Error> {
    serve_with(path, events, Limits::default())
}

/// Like [`serve`], with other limits (tests use short ones).
pub fn serve_with<S: Submit>(path: &Path, events: S, limits: Limits) -> Result<Server, Error> {
    let listener = bind_private(path)?;
    let server = Server {
        path: path.to_path_buf(),
        id: std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino())),
    };
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || accept_loop(&listener, &events, &limits))
        .map_err(Error::Spawn)?;
    Ok(server)
}

/// Where the server hands each request: the session's event queue. The
/// API names no session type; the session's queue implements this.
pub trait Submit: Clone + Send + 'static {
    /// Hands `call` to the session; false if the session is gone.
    fn submit(&self, call: ApiCall) -> bool;
}

/// A plain channel of anything an [`ApiCall`] converts into (tests).
impl<E: From<ApiCall> + Send + 'static> Submit for Sender<E> {
    fn submit(&self, call: ApiCall) -> bool {
        self.send(E::from(call)).is_ok()
    }
}

/// A connection slot, given back when dropped, whatever ends the connection
/// (thread spawn failure included).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        open.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop<S: Submit>(listener: &UnixListener, events: &S, limits: &Limits) {
    let open = Arc::new(AtomicUsize::new(0));
    let hub = Hub::new(limits.max_subscribers);
    let mut next_id = 0u64;
    let mut backoff = Duration::ZERO;
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => {
                backoff = Duration::ZERO;
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                backoff = (backoff * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
                std::thread::sleep(backoff);
                continue;
            }
        };
        if let Err(why) = peer_allowed(&conn) {
            refuse(&conn, &why);
            continue;
        }
        let Some(slot) = Slot::take(&open, limits.max_connections) else {
            refuse(
                &conn,
                &format!("too many connections (at most {})", limits.max_connections),
            );
            continue;
        };
        next_id += 1;
        let id = next_id;
        let spare = conn.try_clone();
        let (events, hub, limits) = (events.clone(), hub.clone(), limits.clone());
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || connection(conn, &events, &hub, &limits, id, slot));
        // On failure the closure is dropped with its slot and connection.
        if spawned.is_err() {
            if let Ok(c) = spare {
                refuse(&c, "cannot start a connection thread");
            }
        }
    }
}

/// Whether the client closed its end entirely.
fn hung_up(conn: &UnixStream) -> bool {
    let mut p = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// One connection's reader; returns when the connection ends, with its
/// slot and subscription given back.
fn connection<S: Submit>(
    conn: UnixStream,
    events: &S,
    hub: &Arc<Hub>,
    limits: &Limits,
    id: u64,
    slot: Slot,
) {
    let _ = conn.set_write_timeout(Some(limits.write_timeout));
    let outbox = Outbox::new(
        limits.queue_lines,
        limits.queue_bytes,
        conn.try_clone().ok(),
    );
    let writer = conn.try_clone().and_then(|w| {
        let o = outbox.clone();
        std::thread::Builder::new()
            .name("api-out".into())
            .spawn(move || write_out(&w, &o))
    });
    let Ok(writer) = writer else {
        refuse(&conn, "cannot start a connection thread");
        return;
    };
    let mut c = Conn {
        conn: &conn,
        outbox: &outbox,
        events,
        hub,
        limits,
        id,
        subscribed: false,
    };
    c.serve();
    // The slot goes back before the writer sends the last line and shuts
    // the socket: a client that sees its connection end can connect again
    // at once (it used to race the writer's join and be refused).
    drop(slot);
    hub.unsubscribe(id);
    outbox.close(Closed::Finished);
    let _ = writer.join();
}

/// The writer: one line at a time under the send timeout (a connection
/// dropped for not reading got its last line from [`Outbox::close`]).
fn write_out(mut w: &UnixStream, outbox: &Outbox) {
    while let Some(line) = outbox.next_line() {
        if w.write_all(line.as_bytes()).is_err() {
            outbox.close(Closed::Broken);
            break;
        }
    }
    let _ = w.shutdown(std::net::Shutdown::Both);
}

struct Conn<'a, S> {
    conn: &'a UnixStream,
    outbox: &'a Arc<Outbox>,
    events: &'a S,
    hub: &'a Arc<Hub>,
    limits: &'a Limits,
    id: u64,
    subscribed: bool,
}

impl<S: Submit> Conn<'_, S> {
    fn serve(&mut self) {
        let mut framer = Framer::new();
        let mut chunk = vec![0u8; 8192];
        let mut last = Instant::now();
        loop {
            while let Some(frame) = framer.next_frame() {
                match frame {
                    Frame::TooLong => {
                        self.say(Answer::err(
                            0,
                            format!("request longer than {MAX_LINE} bytes; closing"),
                        ));
                        return;
                    }
                    Frame::Line(l) => {
                        if !self.handle(&l) {
                            return;
                        }
                        last = Instant::now();
                    }
                }
            }
            let timeout = if self.subscribed {
                None
            } else {
                match self.limits.idle.checked_sub(last.elapsed()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => {
                        self.say(Answer::err(
                            0,
                            format!(
                                "no request for {} s; closing",
                                self.limits.idle.as_secs_f64()
                            ),
                        ));
                        return;
                    }
                }
            };
            if self.conn.set_read_timeout(timeout).is_err() {
                self.outbox.close(Closed::Broken);
                return;
            }
            match (&mut &*self.conn).read(&mut chunk) {
                Ok(0) => {
                    if framer.pending() > 0 {
                        self.say(Answer::err(
                            0,
                            "request without a newline at the end of the stream; not executed",
                        ));
                    }
                    return;
                }
                Ok(n) => framer.push(chunk.get(..n).unwrap_or_default()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted
                            | std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => {
                    self.outbox.close(Closed::Broken);
                    return;
                }
            }
        }
    }

    /// Queues a line; false once the connection is gone.
    fn say(&self, line: String) -> bool {
        self.outbox.push(line, None).is_ok()
    }

    /// Serves one request line; false when the connection must end.
    fn handle(&mut self, line: &[u8]) -> bool {
        let received = Instant::now();
        let envelope = match decode(line) {
            Ok(e) => e,
            Err(e) => return self.say(Answer::err(0, e)),
        };
        let id = envelope.id;
        if envelope.request == Request::Subscribe {
            let events = self.events;
            let until = Instant::now() + self.limits.answer_timeout;
            let answer = match self.hub.subscribe(self.id, self.outbox, until, |reply| {
                let envelope = Envelope {
                    id: 0,
                    request: Request::Subscribe,
                };
                events.submit(ApiCall {
                    envelope,
                    reply,
                    received,
                })
            }) {
                Ok(()) => {
                    self.subscribed = true;
                    Answer::ok(id, serde_json::Value::Null)
                }
                Err(e) => Answer::err(id, e),
            };
            return self.say(answer);
        }
        let wait = match &envelope.request {
            Request::Step(s)
                if matches!(crate::steps::parse(s), Ok(crate::steps::Step::Agent { .. })) =>
            {
                self.limits.agent_answer_timeout
            }
            _ => self.limits.answer_timeout,
        };
        let reply = self.outbox.reply();
        let call = ApiCall {
            envelope,
            reply: reply.clone(),
            received,
        };
        if !self.events.submit(call) {
            return self.say(Answer::err(id, "the run is over"));
        }
        let conn = self.conn;
        match self
            .outbox
            .wait_answer(reply, Instant::now() + wait, || hung_up(conn))
        {
            Waited::Answered => true,
            Waited::Unanswered => self.say(Answer::err(id, "the run ended before answering")),
            Waited::TimedOut => self.say(Answer::err(
                id,
                format!("no answer within {} s", wait.as_secs_f64()),
            )),
            Waited::Gone => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc::{channel, Receiver};

    use super::*;

    /// A session that answers every request with its id, after `delay`.
    fn session(rx: Receiver<ApiCall>, delay: Duration) {
        std::thread::spawn(move || {
            let mut subscribers = Vec::new();
            for call in rx {
                std::thread::sleep(delay);
                let id = call.envelope.id;
                if call.envelope.request == Request::Subscribe {
                    subscribers.push(call.reply.clone());
                }
                let _ = call.reply.send(Answer::ok(id, serde_json::json!(id)));
            }
        });
    }

    fn server(name: &str, limits: Limits, delay: Duration) -> (Server, PathBuf) {
        let path = std::env::temp_dir().join(format!("rasvmm-srv-{}-{name}", std::process::id()));
        let (tx, rx) = channel();
        session(rx, delay);
        (serve_with(&path, tx, limits).unwrap(), path)
    }

    fn ask(c: &UnixStream, line: &[u8]) -> String {
        (&*c).write_all(line).unwrap();
        let mut r = BufReader::new(c);
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l
    }

    fn rest(c: &UnixStream) -> String {
        let mut s = String::new();
        let _ = (&*c).read_to_string(&mut s);
        s
    }

    #[test]
    fn partial_line_at_eof_is_not_executed() {
        let (_s, path) = server("partial", Limits::default(), Duration::ZERO);
        let c = UnixStream::connect(&path).unwrap();
        (&c).write_all(br#"{"id":5,"request":"shutdown"}"#).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let got = rest(&c);
        assert!(
            got.contains("without a newline") && !got.contains("\"id\":5"),
            "{got}"
        );
    }

    #[test]
    fn exact_max_line_and_invalid_utf8_over_the_socket() {
        let (_s, path) = server("exact", Limits::default(), Duration::ZERO);
        let c = UnixStream::connect(&path).unwrap();
        let mut req = br#"{"id":8,"request":"state"}"#.to_vec();
        req.resize(MAX_LINE, b' ');
        req.push(b'\n');
        assert_eq!(ask(&c, &req), "{\"id\":8,\"ok\":8}\n");
        let got = ask(&c, b"{\"id\":9,\"request\":{\"step\":\"exec:\xff\"}}\n");
        assert!(got.contains("not UTF-8"), "{got}");
        let mut long = req.clone();
        long.insert(0, b' ');
        let got = ask(&c, &long);
        assert!(got.contains("longer than 65536"), "{got}");
        assert_eq!(rest(&c), "", "closed after a line too long");
    }

    #[test]
    fn idle_clients_are_closed_and_their_slots_come_back() {
        let limits = Limits {
            max_connections: 4,
            idle: Duration::from_millis(300),
            ..Limits::default()
        };
        let (_s, path) = server("idle", limits, Duration::ZERO);
        let idle: Vec<UnixStream> = (0..4)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let fifth = UnixStream::connect(&path).unwrap();
        assert!(rest(&fifth).contains("too many connections"));
        let t = Instant::now();
        for c in &idle {
            assert!(rest(c).contains("no request for 0.3 s"));
        }
        println!("4 idle clients closed after {:?}", t.elapsed());
        let c = UnixStream::connect(&path).unwrap();
        assert_eq!(
            ask(&c, b"{\"id\":3,\"request\":\"ledger\"}\n"),
            "{\"id\":3,\"ok\":3}\n"
        );
    }

    #[test]
    fn slow_answers_time_out_with_an_error_line() {
        let limits = Limits {
            answer_timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let (_s, path) = server("slow", limits, Duration::from_millis(400));
        let c = UnixStream::connect(&path).unwrap();
        let got = ask(&c, b"{\"id\":4,\"request\":\"state\"}\n");
        assert_eq!(got, "{\"id\":4,\"error\":\"no answer within 0.1 s\"}\n");
        // The late answer still arrives, after the error.
        let mut r = BufReader::new(&c);
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l, "{\"id\":4,\"ok\":4}\n");
    }

    #[test]
    fn subscriber_that_leaves_frees_its_slot_at_once() {
        let limits = Limits {
            max_connections: 2,
            max_subscribers: 1,
            ..Limits::default()
        };
        let (_s, path) = server("sub", limits, Duration::ZERO);
        for round in 0..20 {
            let c = UnixStream::connect(&path).unwrap();
            let got = ask(
                &c,
                format!("{{\"id\":{round},\"request\":\"subscribe\"}}\n").as_bytes(),
            );
            assert_eq!(
                got,
                format!("{{\"id\":{round},\"ok\":null}}\n"),
                "round {round}"
            );
            drop(c);
            // The reader sees EOF and unsubscribes; give it a moment.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
