//! `lab-timer`: times a peer VMM for the benchmarks, inside the lab host.
//!
//! ```text
//! lab-timer <file> <pattern> <timeout-seconds> -- <command> [args...]
//! ```
//!
//! Starts the command, polls `<file>` (where the command writes its guest's
//! agent UART) every millisecond until it contains `<pattern>`, then kills
//! the command and prints `ready_ms=<n> maxrss_kib=<n>`: time from spawn to
//! the pattern, and the command's peak RSS. Exits 1 if the pattern never
//! appears in time.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
    let _ = std::fs::remove_file(file);
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
        if let Ok(text) = std::fs::read_to_string(file) {
            if text.contains(pattern.as_str()) {
                break Some(start.elapsed());
            }
        }
        if start.elapsed() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
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
