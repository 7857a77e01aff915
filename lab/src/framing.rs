//! What crosses the lab host's console: the framed job output
//! (`@@@RASVMM-...` lines, read at the end or run by run while the job
//! runs) and the newc cpio archive that carries a job's files in.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Error, RunResult};

/// The framed output of a lab job.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LabOutput {
    /// Files by name.
    pub files: BTreeMap<String, String>,
    /// rasvmm exit status by run index.
    pub exits: BTreeMap<usize, i32>,
    /// The job ran to its end.
    pub done: bool,
    /// The lab host's own error, if any.
    pub lab_error: Option<String>,
}

/// Parses what a lab job wrote to the results UART.
pub fn parse_results(text: &str) -> LabOutput {
    let mut out = LabOutput::default();
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some((name, body)) = &mut current {
            if line == format!("@@@RASVMM-END {name}") {
                // lab_emit adds a newline after the file; drop it.
                if body.last() == Some(&"") {
                    body.pop();
                }
                let mut s = body.join("\n");
                if !s.is_empty() {
                    s.push('\n');
                }
                out.files.insert(name.clone(), s);
                current = None;
            } else {
                body.push(line);
            }
            continue;
        }
        if let Some(name) = line.strip_prefix("@@@RASVMM-FILE ") {
            current = Some((name.to_string(), Vec::new()));
        } else if let Some(rest) = line.strip_prefix("@@@RASVMM-EXIT ") {
            let mut it = rest.split_whitespace();
            if let (Some(i), Some(c)) = (it.next(), it.next()) {
                if let (Ok(i), Ok(c)) = (i.parse(), c.parse()) {
                    out.exits.insert(i, c);
                }
            }
        } else if line == "@@@RASVMM-JOB-DONE" {
            out.done = true;
        } else if let Some(e) = line.strip_prefix("@@@RASVMM-LAB-ERROR ") {
            out.lab_error = Some(e.to_string());
        }
    }
    out
}

/// Run `i`'s result out of a lab job's framed files.
pub(crate) fn take_run(
    files: &mut BTreeMap<String, String>,
    exits: &BTreeMap<usize, i32>,
    i: usize,
) -> RunResult {
    let mut take = |k: &str| files.remove(&format!("{k}-{i}")).unwrap_or_default();
    let report = serde_json::from_str(take("report").trim()).ok();
    RunResult {
        exit: exits.get(&i).copied().unwrap_or(-1),
        report,
        console: take("console"),
        stderr: take("stderr"),
    }
}

/// Reads a lab host's results channel while the job runs, and hands each
/// run that has finished (its stderr, the last file of a run, is framed)
/// to a callback, once. Reads only what is new on each poll.
pub(crate) struct RunsSoFar<'a> {
    path: &'a Path,
    read: u64,
    pending: String,
    next: usize,
}

impl<'a> RunsSoFar<'a> {
    pub(crate) fn new(path: &'a Path) -> Self {
        RunsSoFar {
            path,
            read: 0,
            pending: String::new(),
            next: 0,
        }
    }

    /// How many runs have finished so far.
    pub(crate) fn finished(&self) -> usize {
        self.next
    }

    pub(crate) fn poll(&mut self, on_run: &mut dyn FnMut(usize, &RunResult)) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(self.path) else {
            return;
        };
        let mut new = Vec::new();
        if f.seek(SeekFrom::Start(self.read)).is_err() || f.read_to_end(&mut new).is_err() {
            return;
        }
        // Only whole lines: a multi-byte character may be cut at the end.
        let Some(end) = new.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        self.read += end as u64 + 1;
        self.pending
            .push_str(&String::from_utf8_lossy(&new[..=end]));
        // The aarch64 lab host's virtio console ends lines with \r\n.
        while let Some(end) = line_end(
            &self.pending,
            &format!("@@@RASVMM-END stderr-{}", self.next),
        ) {
            let chunk: String = self.pending.drain(..end).collect();
            let mut parsed = parse_results(&chunk);
            let run = take_run(&mut parsed.files, &parsed.exits, self.next);
            on_run(self.next, &run);
            self.next += 1;
        }
    }
}

/// Where the line that is exactly `line` (before `\r\n` or `\n`) ends in
/// `text`, past its newline.
fn line_end(text: &str, line: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = text[from..].find(line).map(|i| i + from) {
        let rest = &text[at + line.len()..];
        let starts_line = at == 0 || text[..at].ends_with('\n');
        let eol = if rest.starts_with("\r\n") {
            Some(2)
        } else if rest.starts_with('\n') {
            Some(1)
        } else {
            None
        };
        if let (true, Some(n)) = (starts_line, eol) {
            return Some(at + line.len() + n);
        }
        from = at + line.len();
    }
    None
}

/// A newc cpio archive of `names` (files under `root`), with the trailer.
pub(crate) fn newc_archive(root: &Path, names: &[String]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let mut ino = 1u32;
    let mut dirs: Vec<String> = Vec::new();
    for name in names {
        // Parent directories first.
        let mut acc = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for p in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if !dirs.contains(&acc) {
                dirs.push(acc.clone());
                newc_entry(&mut out, ino, 0o040755, &acc, &[]);
                ino += 1;
            }
        }
        let path = root.join(name);
        let data = std::fs::read(&path).map_err(|e| Error::Io(path.display().to_string(), e))?;
        newc_entry(&mut out, ino, 0o100755, name, &data);
        ino += 1;
    }
    newc_entry(&mut out, 0, 0, "TRAILER!!!", &[]);
    Ok(out)
}

pub(crate) fn newc_entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 1, 0, data.len(), 0, 0, 0, 0, 0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_unframed() {
        let text = "noise\n@@@RASVMM-EXIT 0 1\n@@@RASVMM-FILE report-0\n{\"a\":1}\n\n@@@RASVMM-END report-0\n\
                    @@@RASVMM-FILE console-0\nline 1\nline 2\n\n@@@RASVMM-END console-0\n@@@RASVMM-JOB-DONE\n";
        let r = parse_results(text);
        assert!(r.done);
        assert_eq!(r.exits.get(&0), Some(&1));
        assert_eq!(r.files["report-0"], "{\"a\":1}\n");
        assert_eq!(r.files["console-0"], "line 1\nline 2\n");
    }

    #[test]
    fn truncated_results_are_not_done() {
        let r = parse_results("@@@RASVMM-FILE x\nabc\n");
        assert!(!r.done);
        assert!(r.files.is_empty());
        let e = parse_results("@@@RASVMM-LAB-ERROR /dev/kvm is missing\n");
        assert_eq!(e.lab_error.as_deref(), Some("/dev/kvm is missing"));
    }

    #[test]
    fn newc_headers_are_aligned() {
        let mut out = Vec::new();
        newc_entry(&mut out, 1, 0o100644, "job.sh", b"echo\n");
        assert_eq!(&out[..6], b"070701");
        assert_eq!(out.len() % 4, 0);
        assert_eq!(out.len(), 112 + 8 + 8);
    }

    #[test]
    fn whole_lines_are_found_with_either_newline() {
        let t = "x\n@@@END stderr-1\r\nb\n@@@END stderr-10\n";
        assert_eq!(line_end(t, "@@@END stderr-1"), Some(19));
        assert_eq!(line_end(t, "@@@END stderr-10"), Some(t.len()));
        assert_eq!(line_end("@@@END stderr-1", "@@@END stderr-1"), None);
        assert_eq!(line_end("a@@@END stderr-1\n", "@@@END stderr-1"), None);
        assert_eq!(line_end("@@@END stderr-10\n", "@@@END stderr-1"), None);
    }
}
