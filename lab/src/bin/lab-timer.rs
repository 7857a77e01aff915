//! `lab-timer`: times a peer VMM for the benchmarks, inside the lab host.
//!
//! ```text
//! lab-timer <file> <pattern> <timeout-seconds> -- <command> [args...]
//! lab-timer --trigger <file> <pattern> <timeout-seconds> -- <command> [args...]
//! ```
//!
//! Starts the command, polls `<file>` (where a guest's UART is written)
//! every millisecond until it contains `<pattern>` and prints
//! `ready_ms=<n>`: the time from spawn to the pattern. Without `--trigger`
//! the command is the VMM: it is killed at the pattern and its peak RSS is
//! printed too (`maxrss_kib=<n>`). With `--trigger` the command is what
//! provokes the pattern (an injection request) in an already running VMM;
//! only text that appears after the spawn counts. Exits 1 if the pattern
//! never appears in time.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let trigger = args.first().is_some_and(|a| a == "--trigger");
    if trigger {
        args.remove(0);
    }
    let Some(sep) = args.iter().position(|a| a == "--") else {
        eprintln!("usage: lab-timer <file> <pattern> <timeout-seconds> -- <command> [args...]");
        return ExitCode::from(2);
    };
    let (Some(file), Some(pattern), Some(timeout), Some(cmd)) =
        (args.first(), args.get(1), args.get(2), args.get(sep + 1))
    else {
        eprintln!("usage: lab-timer <file> <pattern> <timeout-seconds> -- <command> [args...]");
        return ExitCode::from(2);
    };
    let Ok(timeout) = timeout.parse::<u64>() else {
        eprintln!("lab-timer: timeout must be whole seconds");
        return ExitCode::from(2);
    };
    // Only text written after the spawn counts.
    let skip = if trigger {
        std::fs::metadata(file).map_or(0, |m| usize::try_from(m.len()).unwrap_or(0))
    } else {
        let _ = std::fs::remove_file(file);
        0
    };
    let start = Instant::now();
    let mut child = match Command::new(cmd).args(&args[sep + 2..]).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lab-timer: cannot start {cmd}: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = Duration::from_secs(timeout);
    let ready = loop {
        if let Ok(bytes) = std::fs::read(file) {
            let text = String::from_utf8_lossy(bytes.get(skip..).unwrap_or_default());
            if text.contains(pattern.as_str()) {
                break Some(start.elapsed());
            }
        }
        if start.elapsed() > deadline || (!trigger && matches!(child.try_wait(), Ok(Some(_)))) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if trigger {
        let _ = child.wait();
        return match ready {
            Some(d) => {
                println!("ready_ms={}", d.as_millis());
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("lab-timer: '{pattern}' did not appear in {file}");
                ExitCode::from(1)
            }
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
        Some(d) => {
            println!("ready_ms={} maxrss_kib={}", d.as_millis(), usage.ru_maxrss);
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("lab-timer: '{pattern}' did not appear in {file}");
            ExitCode::from(1)
        }
    }
}
