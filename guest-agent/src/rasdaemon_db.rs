//! Reads rasdaemon's database in the guest (the rasdaemon image) with
//! Debian's sqlite3, which the image carries as a rasdaemon dependency, and
//! whether rasdaemon runs. A table rasdaemon does not have (mce_record on
//! arm64) or a database not written yet reads as no rows.
//!
//! The database is read once, after rasdaemon's output shows the events
//! asked for, never polled while rasdaemon writes: rasdaemon commits without
//! a busy timeout, so a reader holding the database at that moment makes it
//! drop the record (seen in CI: a memory_failure_event lost). rasdaemon
//! prints each event after its handler stored it.

use std::path::Path;
use std::process::{Command as ProcCommand, Stdio};
use std::time::{Duration, Instant};

use guest_agent::rasdaemon::{RasdaemonView, MAX_ROWS, MAX_TEXT, MAX_WAIT_MS};
use serde::de::DeserializeOwned;

/// Where the rasdaemon image has it.
const RASDAEMON: &str = "/usr/sbin/rasdaemon";
/// Its database (`rasdaemon -r`).
const DATABASE: &str = "/var/lib/rasdaemon/ras-mc_event.db";
/// Its output, as the guest's init redirects it.
const LOG: &str = "/var/log/rasdaemon.log";

/// The events whose rows the view reads, as rasdaemon's output names them.
const EVENTS: [&str; 3] = ["mc_event", "mce_record", "memory_failure_event"];
/// Most of rasdaemon's output read to count its events.
const MAX_LOG: u64 = 4 << 20;

/// What rasdaemon recorded, once its output shows `at_least` events (or
/// [`MAX_WAIT_MS`] passed, or rasdaemon is not running).
pub(crate) fn rasdaemon(at_least: u32) -> Result<RasdaemonView, String> {
    if !Path::new(RASDAEMON).exists() {
        return Err(
            "this guest image has no rasdaemon (the rasdaemon image: [guest] image = \"rasdaemon\")"
                .into(),
        );
    }
    let deadline = Instant::now() + Duration::from_millis(MAX_WAIT_MS);
    let want = usize::try_from(at_least).unwrap_or(usize::MAX);
    while running() && events_logged() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    read()
}

/// Events rasdaemon has printed: one line each, in the trace's format
/// (`<comm>-<pid> [<cpu>] <flags> <time> mc_event ...`), unlike its own
/// messages, which start `rasdaemon:` (some name the events too: "mc_event
/// store: ...").
fn events_logged() -> usize {
    use std::io::Read;
    let mut text = Vec::new();
    if let Ok(f) = std::fs::File::open(LOG) {
        let _ = f.take(MAX_LOG).read_to_end(&mut text);
    }
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| !l.trim_start().starts_with("rasdaemon:"))
        .filter(|l| l.split_whitespace().any(|w| EVENTS.contains(&w)))
        .count()
}

fn read() -> Result<RasdaemonView, String> {
    let mut view = RasdaemonView {
        running: running(),
        mc_event: rows("mc_event")?,
        mce_record: rows("mce_record")?,
        memory_failure_event: rows("memory_failure_event")?,
        log_tail: log_tail(),
    };
    view.fit();
    Ok(view)
}

/// Whether a process named rasdaemon runs.
fn running() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .any(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "rasdaemon")
        })
}

/// A table's newest rows, at most [`MAX_ROWS`], oldest first.
fn rows<T: DeserializeOwned>(table: &str) -> Result<Vec<T>, String> {
    if !Path::new(DATABASE).exists() {
        return Ok(Vec::new());
    }
    // rasdaemon may be writing: wait for its lock rather than fail.
    let out = ProcCommand::new("sqlite3")
        .args(["-readonly", "-json", "-cmd", ".timeout 2000", DATABASE])
        .arg(format!(
            "SELECT * FROM (SELECT * FROM {table} ORDER BY id DESC LIMIT {MAX_ROWS}) ORDER BY id"
        ))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("sqlite3: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("no such table") {
            return Ok(Vec::new());
        }
        return Err(format!("sqlite3 on {table}: {}", err.trim()));
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("rasdaemon's {table} rows: {e}"))
}

/// The last lines of rasdaemon's output (from its last 4 KiB).
fn log_tail() -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut tail = Vec::new();
    if let Ok(mut f) = std::fs::File::open(LOG) {
        if f.seek(SeekFrom::End(-4096)).is_err() {
            let _ = f.seek(SeekFrom::Start(0));
        }
        let _ = f.take(4096).read_to_end(&mut tail);
    }
    let text = String::from_utf8_lossy(&tail).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..]
        .iter()
        .map(|l| l.chars().take(MAX_TEXT).collect())
        .collect()
}
