//! `rasvmm-lab`: run rasvmm where Linux guests can run (see the `lab` crate).
//!
//! ```text
//! rasvmm-lab run [RASVMM-RUN-ARGS...]   one rasvmm run; prints its summary
//! rasvmm-lab suite [DIR] [--junit F] [--json F]  run scenario files, print verdicts
//! rasvmm-lab demo                       boot the default guest, print outcome and boot time
//! rasvmm-lab bench-boot [--runs N]      rasvmm vs QEMU boot-to-agent-ready (lab backend)
//! rasvmm-lab bench-inject [--runs N]    rasvmm vs QEMU injection-to-panic (lab backend)
//! rasvmm-lab smp-boots [--runs N]       2-vCPU boot failures, rasvmm vs QEMU (lab backend)
//! ```

use std::process::ExitCode;
use std::time::Duration;

use lab::{Job, Lab};

mod bench;
mod smp;
mod suite;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("demo") => demo(),
        Some("suite") => suite::run(&args[1..]),
        Some("bench-boot") => bench::boot(&args[1..]),
        Some("bench-inject") => bench::inject(&args[1..]),
        Some("bench-ghes") => bench::ghes(&args[1..]),
        Some("bench-kho") => bench::kho(&args[1..]),
        Some("smp-boots") => smp::boots(&args[1..]),
        Some("-h" | "--help") | None => {
            eprintln!(
                "usage: rasvmm-lab run [rasvmm run args...] | suite [DIR] [--junit F] [--json F] | demo | bench-boot [--runs N] | bench-inject [--runs N] | bench-ghes [--runs N] | bench-kho [--gib N] | smp-boots [--runs N]"
            );
            return if args.is_empty() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        Some(other) => Err(format!(
            "unknown command '{other}' (run, suite, demo, bench-boot, bench-inject, bench-ghes, bench-kho, smp-boots)"
        )),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Opens the lab on the detected backend.
pub fn open_lab() -> Result<Lab, String> {
    Lab::new().map_err(|e| chain(&e))
}

/// One line saying where guests run.
pub fn describe(lab: &Lab) -> String {
    format!(
        "backend: {} (host KVM: {}); guest kernel {}",
        lab.backend,
        lab::host_kvm(),
        lab.manifest.kernel_version
    )
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let lab = open_lab()?;
    eprintln!("{}", describe(&lab));
    let timeout = args
        .iter()
        .position(|a| a == "--timeout")
        .and_then(|i| args.get(i + 1))
        .and_then(|t| t.parse::<f64>().ok())
        .and_then(|t| vmm::config::parse_timeout(t).ok())
        .unwrap_or(Duration::from_secs_f64(vmm::config::DEFAULT_TIMEOUT_S));
    let job = Job {
        runs: vec![args.to_vec()],
        timeout,
        files: Vec::new(),
    };
    let res = lab.run(&job).map_err(|e| chain(&e))?;
    let r = res.runs.first().ok_or("the job produced no run")?;
    eprint!("{}", r.stderr);
    if let Some(report) = &r.report {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    }
    eprintln!("wall time: {:.1} s", res.wall.as_secs_f64());
    Ok(ExitCode::from(u8::try_from(r.exit).unwrap_or(2)))
}

fn demo() -> Result<ExitCode, String> {
    let lab = open_lab()?;
    println!("{}", describe(&lab));
    let job = Job::one(
        &[
            "--vcpus",
            "2",
            "--agent",
            "exec:uname -r; nproc",
            "--agent",
            "poweroff",
        ],
        Duration::from_secs(120),
    );
    let res = lab.run(&job).map_err(|e| chain(&e))?;
    let r = res.runs.first().ok_or("the job produced no run")?;
    let ready = r
        .report
        .as_ref()
        .and_then(|v| v["agent_ready_ms"].as_u64())
        .map_or("never".to_string(), |ms| {
            format!("{:.2} s", ms as f64 / 1000.0)
        });
    println!("outcome: {}", r.outcome());
    println!("boot to agent ready: {ready}");
    println!(
        "wall time (with {}): {:.1} s",
        res.backend,
        res.wall.as_secs_f64()
    );
    if r.outcome() != "poweroff" {
        eprintln!("{r}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// An error with its causes on one line.
pub use vmm::report::one_line as chain;
