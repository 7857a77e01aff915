//! `lab-timer`: times a peer VMM for the benchmarks, inside the lab host.
//!
//! ```text
//! lab-timer <file> <pattern> [<file> <pattern>...] <timeout-seconds> -- <command> [args...]
//! lab-timer --trigger <file> <pattern> [<file> <pattern>...] <timeout-seconds> -- <command> [args...]
//! ```
//!
//! Starts the command, polls each `<file>` (where a guest's UART is
//! written) every millisecond until one contains its `<pattern>` and
//! prints `ready_ms=<n>`: the time from spawn to the first pattern, and
//! `matched=<k>`, which pair it was (0 for the first). Several pairs time
//! to whichever of several outcomes comes first (a signal report or a
//! panic line). Without `--trigger` the command is the VMM: it is killed
//! at the pattern and its peak RSS is printed too (`maxrss_kib=<n>`). With
//! `--trigger` the command is what provokes the pattern (an injection
//! request) in an already running VMM; only text that appears after the
//! spawn counts. Exits 1 if no pattern appears in time.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: lab-timer [--trigger] <file> <pattern> [<file> <pattern>...] <timeout-seconds> -- <command> [args...]";

/// The (file, pattern) pairs and the timeout before `--`.
fn parse(before: &[String]) -> Option<(Vec<(&str, &str)>, &str)> {
    let (timeout, pairs) = before.split_last()?;
    if pairs.is_empty() || pairs.len() % 2 != 0 {
        return None;
    }
    let pairs = pairs
        .chunks(2)
        .map(|p| (p[0].as_str(), p[1].as_str()))
        .collect();
    Some((pairs, timeout.as_str()))
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let trigger = args.first().is_some_and(|a| a == "--trigger");
    if trigger {
        args.remove(0);
    }
    let Some(sep) = args.iter().position(|a| a == "--") else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let (Some((pairs, timeout)), Some(cmd)) = (parse(&args[..sep]), args.get(sep + 1)) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let Ok(timeout) = timeout.parse::<u64>() else {
        eprintln!("lab-timer: timeout must be whole seconds");
        return ExitCode::from(2);
    };
    // Only text written after the spawn counts.
    let skips: Vec<usize> = pairs
        .iter()
        .map(|(file, _)| {
            if trigger {
                std::fs::metadata(file).map_or(0, |m| usize::try_from(m.len()).unwrap_or(0))
            } else {
                let _ = std::fs::remove_file(file);
                0
            }
        })
        .collect();
    let start = Instant::now();
    let mut child = match Command::new(cmd).args(&args[sep + 2..]).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lab-timer: cannot start {cmd}: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = Duration::from_secs(timeout);
    let seen = |k: usize| -> bool {
        let (file, pattern) = pairs[k];
        std::fs::read(file).is_ok_and(|bytes| {
            String::from_utf8_lossy(bytes.get(skips[k]..).unwrap_or_default()).contains(pattern)
        })
    };
    let ready = loop {
        if let Some(k) = (0..pairs.len()).find(|&k| seen(k)) {
            break Some((start.elapsed(), k));
        }
        if start.elapsed() > deadline || (!trigger && matches!(child.try_wait(), Ok(Some(_)))) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let missing = || {
        let what: Vec<String> = pairs
            .iter()
            .map(|(file, pattern)| format!("'{pattern}' in {file}"))
            .collect();
        eprintln!("lab-timer: none of {} appeared", what.join(", "));
        ExitCode::from(1)
    };
    if trigger {
        let _ = child.wait();
        return match ready {
            Some((d, k)) => {
                println!("ready_ms={} matched={k}", d.as_millis());
                ExitCode::SUCCESS
            }
            None => missing(),
        };
    }
    let _ = child.kill();
    let pid = i32::try_from(child.id()).unwrap_or(0);
    // SAFETY: rusage is plain data; wait4 reaps our own child and fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut status = 0;
    // SAFETY: valid pointers to locals; `pid` is our child.
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    match ready {
        Some((d, k)) => {
            println!(
                "ready_ms={} maxrss_kib={} matched={k}",
                d.as_millis(),
                usage.ru_maxrss
            );
            ExitCode::SUCCESS
        }
        None => missing(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pairs_then_timeout() {
        let one = strings(&["/tmp/a", "hello", "30"]);
        assert_eq!(parse(&one), Some((vec![("/tmp/a", "hello")], "30")));
        let two = strings(&["/tmp/a", "\"signal\"", "/tmp/c", "Kernel panic", "10"]);
        assert_eq!(
            parse(&two),
            Some((
                vec![("/tmp/a", "\"signal\""), ("/tmp/c", "Kernel panic")],
                "10"
            ))
        );
        assert_eq!(parse(&strings(&["30"])), None);
        assert_eq!(parse(&strings(&["/tmp/a", "30"])), None);
        assert_eq!(parse(&[]), None);
    }
}
