//! Reads rasdaemon's database in the guest (the rasdaemon image) with
//! Debian's sqlite3, which the image carries as a rasdaemon dependency, and
//! whether rasdaemon runs. A table rasdaemon does not have (mce_record on
//! arm64) or a database not written yet reads as no rows.

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

/// What rasdaemon recorded, once its tables hold `at_least` rows (or
/// [`MAX_WAIT_MS`] passed, or rasdaemon is not running).
pub(crate) fn rasdaemon(at_least: u32) -> Result<RasdaemonView, String> {
    if !Path::new(RASDAEMON).exists() {
        return Err(
            "this guest image has no rasdaemon (the rasdaemon image: [guest] image = \"rasdaemon\")"
                .into(),
        );
    }
    let deadline = Instant::now() + Duration::from_millis(MAX_WAIT_MS);
    loop {
        let view = read()?;
        let enough = view.rows() >= usize::try_from(at_least).unwrap_or(usize::MAX);
        if enough || !view.running || Instant::now() >= deadline {
            return Ok(view);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read() -> Result<RasdaemonView, String> {
    Ok(RasdaemonView {
        running: running(),
        mc_event: rows("mc_event")?,
        mce_record: rows("mce_record")?,
        memory_failure_event: rows("memory_failure_event")?,
        log_tail: log_tail(),
    })
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

/// A table's rows, oldest first, at most [`MAX_ROWS`].
fn rows<T: DeserializeOwned>(table: &str) -> Result<Vec<T>, String> {
    if !Path::new(DATABASE).exists() {
        return Ok(Vec::new());
    }
    let out = ProcCommand::new("sqlite3")
        .args(["-readonly", "-json", DATABASE])
        .arg(format!(
            "SELECT * FROM {table} ORDER BY id LIMIT {MAX_ROWS}"
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

/// The last lines of rasdaemon's output.
fn log_tail() -> Vec<String> {
    let text = std::fs::read(LOG).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(4096)..]).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..]
        .iter()
        .map(|l| l.chars().take(MAX_TEXT).collect())
        .collect()
}
