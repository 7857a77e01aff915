//! The control API: JSON lines on a Unix socket.
//!
//! `rasvmm run --api-socket PATH` listens on PATH (created 0600; never a
//! network socket). Each request is one line, each answer one line:
//!
//! ```text
//! -> {"id":1,"request":{"step":"inject:srao:0x2000000"}}
//! <- {"id":1,"ok":null}
//! -> {"id":2,"request":{"mce":{"vcpu":0,"bank":9,"status":13763000838258901184,"addr":33554432,"misc":140,"mcg_status":5}}}
//! <- {"id":2,"error":"Invalid machine-check record: ..."}
//! -> {"id":3,"request":"ledger"}
//! <- {"id":3,"ok":[{"gpa":33554432,"source":"injected","poisoned_at_ms":5210,"consumptions":0}]}
//! -> {"id":4,"request":"subscribe"}
//! <- {"id":4,"ok":null}
//! <- {"event":{"event":"consumed","vcpu":0,"gpa":33554432,...}}
//! ```
//!
//! Requests: `{"step": "<step>"}` (any `--step`: agent requests, inject,
//! poison, ghes-memory, ghes-raw; `wait` is the client's business), `{"mce": {...}}` (a raw record
//! for experts, validated against the guest's MCG_CAP), `"ledger"`,
//! `"kho"` (the guest's own poison list read from its KHO state, compared
//! with the ledger), `"state"`, `"subscribe"` (RAS events, signals and the outcome as they
//! happen, like QEMU's MEMORY_FAILURE event), `"shutdown"`. A malformed or
//! refused request gets an `error` and leaves the VM untouched.
//!
//! - [`wire`]: line framing and request decoding (no socket; fuzzed);
//! - [`outbox`]: each connection's bounded queue of answers and events, the
//!   [`Reply`] handle the session answers through, and the event fan-out;
//! - [`server`]: the accept loop, connections, and the [`Limits`]
//!   (docs/control-api.md, "Limits"); `socket`: the socket file, created
//!   private, and the peer check.

pub mod outbox;
pub mod server;
mod socket;
pub mod wire;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use outbox::{Dropped, Reply};
pub use server::{serve, serve_with, Limits, Server, Submit};
pub use wire::MAX_LINE;

/// Errors starting the API.
#[derive(Debug, Error)]
pub enum Error {
    /// Something other than a stale socket is at the path.
    #[error("API socket path '{0}' exists and is not a socket")]
    PathInUse(String),
    /// Another process listens there.
    #[error("API socket '{0}' is in use by another process")]
    InUse(String),
    /// The socket cannot be created.
    #[error("Cannot create API socket '{0}'")]
    Bind(String, #[source] std::io::Error),
    /// The listener thread cannot start.
    #[error("Cannot start the API thread")]
    Spawn(#[source] std::io::Error),
}

/// A raw machine-check record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMce {
    /// Target vCPU.
    pub vcpu: u8,
    /// Bank.
    pub bank: u8,
    /// MCi_STATUS.
    pub status: u64,
    /// MCi_ADDR.
    pub addr: u64,
    /// MCi_MISC.
    pub misc: u64,
    /// MCG_STATUS.
    pub mcg_status: u64,
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// A step in the `--step` syntax.
    Step(String),
    /// A raw machine-check record.
    Mce(RawMce),
    /// The poison ledger.
    Ledger,
    /// The guest's own poison list from its KHO state, against the ledger.
    Kho,
    /// The run's state.
    State,
    /// Stream events on this connection.
    Subscribe,
    /// Stop the VM.
    Shutdown,
}

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Echoed in the answer.
    pub id: u64,
    /// The request.
    pub request: Request,
}

/// An answer line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The request's id.
    pub id: u64,
    /// The result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<serde_json::Value>,
    /// Why not, otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Answer {
    /// A success.
    pub fn ok(id: u64, v: serde_json::Value) -> String {
        line(&Answer {
            id,
            ok: Some(v),
            error: None,
        })
    }

    /// A failure.
    pub fn err(id: u64, e: impl ToString) -> String {
        line(&Answer {
            id,
            ok: None,
            error: Some(e.to_string()),
        })
    }
}

/// One JSON line with its newline.
pub fn line<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string(v).unwrap_or_default();
    s.push('\n');
    s
}

/// A request from a connection, for the session; answers go to `reply`.
#[derive(Debug)]
pub struct ApiCall {
    /// The request.
    pub envelope: Envelope,
    /// Where the answer goes (and, for subscribers, events): bounded, never
    /// blocking, failing once the connection is gone.
    pub reply: Reply,
    /// When rasvmm had the whole request line: where an injection's
    /// `vmm_us` starts.
    pub received: std::time::Instant,
}

/// Parses a request line (without its newline); the error is what to
/// tell the client.
pub fn parse(line: &str) -> Result<Envelope, String> {
    if line.len() > MAX_LINE {
        return Err(format!("request longer than {MAX_LINE} bytes"));
    }
    serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))
}

/// A client request from command-line words: `ledger`, `state`,
/// `subscribe` (or `events`), `shutdown`, `mce:<vcpu>:<bank>:<status>:<addr>:<misc>:<mcg_status>`,
/// a JSON request, or any step.
pub fn client_request(words: &str) -> Result<Request, String> {
    let w = words.trim();
    match w {
        "ledger" => return Ok(Request::Ledger),
        "kho" => return Ok(Request::Kho),
        "state" => return Ok(Request::State),
        "subscribe" | "events" => return Ok(Request::Subscribe),
        "shutdown" => return Ok(Request::Shutdown),
        _ => {}
    }
    if w.starts_with('{') || w.starts_with('"') {
        return serde_json::from_str(w).map_err(|e| format!("malformed request: {e}"));
    }
    if let Some(rest) = w.strip_prefix("mce:") {
        let f: Vec<&str> = rest.split(':').collect();
        let num = |s: &str| -> Result<u64, String> {
            crate::steps::number(s).ok_or_else(|| format!("'{s}' is not a number"))
        };
        if f.len() != 6 {
            return Err("expected mce:<vcpu>:<bank>:<status>:<addr>:<misc>:<mcg_status>".into());
        }
        let small = |s: &str| -> Result<u8, String> {
            u8::try_from(num(s)?).map_err(|_| format!("'{s}' is too large"))
        };
        return Ok(Request::Mce(RawMce {
            vcpu: small(f[0])?,
            bank: small(f[1])?,
            status: num(f[2])?,
            addr: num(f[3])?,
            misc: num(f[4])?,
            mcg_status: num(f[5])?,
        }));
    }
    let step = match w.split_once(char::is_whitespace) {
        Some((verb @ ("ghes-memory" | "ghes-raw"), flags)) => ghes_step(verb, flags)?,
        _ => w.to_string(),
    };
    crate::steps::parse(&step).map_err(|e| e.to_string())?;
    Ok(Request::Step(step))
}

/// The step for the CLI's option form of the GHES requests:
/// `ghes-memory --severity S --gpa A [--source N] [--threshold] [--vcpu V]`
/// and `ghes-raw --source N --record HEX`.
fn ghes_step(verb: &str, flags: &str) -> Result<String, String> {
    let mut opts: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    let mut words = flags.split_whitespace();
    while let Some(f) = words.next() {
        let name = f
            .strip_prefix("--")
            .ok_or_else(|| format!("{verb}: expected an option, found '{f}'"))?;
        let value = if name == "threshold" {
            ""
        } else {
            words
                .next()
                .ok_or_else(|| format!("{verb}: --{name} needs a value"))?
        };
        let known: &[&str] = if verb == "ghes-raw" {
            &["source", "record"]
        } else {
            &["severity", "gpa", "source", "threshold", "vcpu"]
        };
        if !known.contains(&name) {
            return Err(format!(
                "{verb}: unknown option --{name} (options: --{})",
                known.join(", --")
            ));
        }
        if opts.insert(name, value).is_some() {
            return Err(format!("{verb}: --{name} given twice"));
        }
    }
    let need = |n: &str| {
        opts.get(n)
            .copied()
            .ok_or_else(|| format!("{verb}: --{n} is required"))
    };
    if verb == "ghes-raw" {
        return Ok(format!("ghes-raw:{}:{}", need("source")?, need("record")?));
    }
    let mut step = format!("ghes-memory:{}:{}", need("severity")?, need("gpa")?);
    if let Some(s) = opts.get("source") {
        step.push_str(&format!(":source={s}"));
    }
    if opts.contains_key("threshold") {
        step.push_str(":threshold");
    }
    if let Some(v) = opts.get("vcpu") {
        step.push_str(&format!(":vcpu={v}"));
    }
    Ok(step)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::channel;

    use super::*;

    #[test]
    fn ghes_option_form() {
        assert_eq!(
            client_request("ghes-memory --severity recoverable --gpa 0x2000000 --source gsiv"),
            Ok(Request::Step(
                "ghes-memory:recoverable:0x2000000:source=gsiv".into()
            ))
        );
        assert_eq!(
            client_request("ghes-memory --gpa 0x1000 --severity corrected --threshold"),
            Ok(Request::Step(
                "ghes-memory:corrected:0x1000:threshold".into()
            ))
        );
        assert_eq!(
            client_request("ghes-raw --source polled --record 0011"),
            Ok(Request::Step("ghes-raw:polled:0011".into()))
        );
        for bad in [
            "ghes-memory --gpa 0x1000",
            "ghes-memory --severity fatal --gpa 0x1000 --source sci",
            "ghes-memory --severity fatal --gpa",
            "ghes-memory --severity fatal --gpa 1 --gpa 2",
            "ghes-memory --colour red",
            "ghes-raw --source nmi",
            "ghes-raw --source nmi --record 0",
        ] {
            assert!(client_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wire_format() {
        let e = Envelope {
            id: 3,
            request: Request::Step("poison:page0".into()),
        };
        assert_eq!(
            line(&e),
            "{\"id\":3,\"request\":{\"step\":\"poison:page0\"}}\n"
        );
        assert_eq!(
            parse(r#"{"id":4,"request":"ledger"}"#).unwrap().request,
            Request::Ledger
        );
        assert_eq!(Answer::err(5, "no"), "{\"id\":5,\"error\":\"no\"}\n");
        for bad in [
            "",
            "{}",
            "ledger",
            r#"{"id":1,"request":"reboot"}"#,
            r#"{"id":1,"request":"ledger","x":1}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_words() {
        assert_eq!(client_request("events"), Ok(Request::Subscribe));
        assert_eq!(
            client_request("inject:srar:page0"),
            Ok(Request::Step("inject:srar:page0".into()))
        );
        assert_eq!(
            client_request("mce:0:9:0xbd000000000000c0:0x2000000:0x8c:5"),
            Ok(Request::Mce(RawMce {
                vcpu: 0,
                bank: 9,
                status: 0xbd00_0000_0000_00c0,
                addr: 0x200_0000,
                misc: 0x8c,
                mcg_status: 5
            }))
        );
        assert!(client_request("mce:0:9").is_err());
        for bad in [
            "mce:+0:9:1:1:1:1",
            "mce:0:9:0x+1:1:1:1",
            "mce:0:9:1:1:1: 1",
            "mce:0:9:1_0:1:1:1",
            "poison:+4096",
            "ghes-raw --source nmi --record +1+1",
            "ghes-memory --severity fatal --gpa +0x1000",
        ] {
            assert!(client_request(bad).is_err(), "{bad}");
        }
        assert!(client_request("mce:0:999:1:1:1:1").is_err());
        assert!(client_request("reboot")
            .unwrap_err()
            .starts_with("Bad step 'reboot'"));
    }

    #[test]
    fn socket_is_private_and_forwards_requests() {
        let dir = std::env::temp_dir().join(format!("rasvmm-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let (tx, rx) = channel::<ApiCall>();
        let server = serve(&path, tx).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing but the socket is left in the directory.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert!(matches!(
            serve(&path, channel::<ApiCall>().0),
            Err(Error::InUse(_))
        ));
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"{\"id\":7,\"request\":\"state\"}\nnot json\n")
            .unwrap();
        let call = rx.recv().unwrap();
        assert_eq!(call.envelope.id, 7);
        call.reply
            .send(Answer::ok(7, serde_json::json!("fine")))
            .unwrap();
        // One request at a time: the answer, then the next line's error.
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l, "{\"id\":7,\"ok\":\"fine\"}\n");
        l.clear();
        r.read_line(&mut l).unwrap();
        assert!(
            l.starts_with("{\"id\":0,\"error\":\"malformed request"),
            "{l}"
        );
        drop(server);
        assert!(!path.exists(), "the socket file goes with the server");
        // A regular file at the path is never removed, nor a symlink
        // followed.
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            serve(&path, channel::<ApiCall>().0),
            Err(Error::PathInUse(_))
        ));
        std::fs::remove_file(&path).unwrap();
        let target = dir.join("target");
        std::fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(
            serve(&path, channel::<ApiCall>().0),
            Err(Error::PathInUse(_))
        ));
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_ne!(mode, 0o600, "the symlink's target keeps its mode");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
