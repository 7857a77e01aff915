//! `rasvmm-lab`: run rasvmm where Linux guests can run (see the `lab` crate).
//!
//! ```text
//! rasvmm-lab run [--arch A] [RASVMM-RUN-ARGS...]  one rasvmm run; prints its summary
//! rasvmm-lab suite [--arch A] [DIR] [--kernel [NAME=]PATH]... [--kernels FILE | --matrix]
//!                  [--shard K/N] [--junit F] [--json F]
//!                                       run scenario files on each kernel, print verdicts
//!                                       as they come, the table per kernel and the matrix
//! rasvmm-lab merge [--junit F] [--json F] SHARD.json...  join shards' results
//! rasvmm-lab demo [--arch A]            boot the default guest, print outcome and boot time
//! rasvmm-lab shell [--arch A] [--timeout S] [--file NAME=PATH]... SCRIPT
//!                                       run a shell script where rasvmm runs (in the lab
//!                                       host: $RASVMM, $KERNEL, $INITRAMFS set; files in $JOB)
//! rasvmm-lab bench-boot [--arch A] [--runs N] [--kernel [NAME=]PATH]  rasvmm vs QEMU boot-to-agent-ready (lab backend)
//! rasvmm-lab bench-inject [--arch A] [--runs N]  rasvmm vs QEMU injection to verdict (lab backend)
//! rasvmm-lab bench-ghes [--arch A] [--runs N]    rasvmm's action-optional paths to the AO SIGBUS
//! rasvmm-lab bench-host-poison [--arch A] [--runs N]  host memory failing under a guest page:
//!                                       each VMM's guest's verdict and time, rasvmm vs QEMU (lab backend)
//! rasvmm-lab bench-kho [--gib N]        the KHO observer's scan speed (this host)
//! rasvmm-lab smp-boots [--runs N]       2-vCPU boot failures, rasvmm vs QEMU (lab backend)
//! ```
//!
//! `--arch` (x86_64, the default, or aarch64) chooses the guests'
//! architecture; bench-kho and smp-boots are x86_64 only.

use std::process::ExitCode;
use std::time::Duration;

use lab::{Arch, Job, Lab};

mod bench;
mod smp;
mod suite;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (arch, rest) = match take_arch(args.get(1..).unwrap_or_default()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let x86_only = |name: &str| -> Result<(), String> {
        if arch == Arch::X86_64 {
            Ok(())
        } else {
            Err(format!("{name} is x86_64 only"))
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("run") => run(arch, &rest),
        Some("demo") => demo(arch),
        Some("suite") => suite::run(arch, &rest),
        Some("merge") => suite::merge(&rest),
        Some("shell") => shell(arch, &rest),
        Some("bench-boot") => bench::boot(arch, &rest),
        Some("bench-inject") => bench::inject(arch, &rest),
        Some("bench-ghes") => bench::ghes(arch, &rest),
        Some("bench-host-poison") => bench::host_poison(arch, &rest),
        Some("bench-kho") => x86_only("bench-kho").and_then(|()| bench::kho(&rest)),
        Some("smp-boots") => x86_only("smp-boots").and_then(|()| smp::boots(&rest)),
        Some("-h" | "--help") | None => {
            eprintln!(
                "usage: rasvmm-lab run [--arch A] [rasvmm run args...] | suite [--arch A] [DIR] [--kernel [NAME=]PATH]... [--kernels F | --matrix] [--shard K/N] [--junit F] [--json F] | merge [--junit F] [--json F] SHARD.json... | demo [--arch A] | shell [--arch A] [--timeout S] [--file NAME=PATH]... SCRIPT | bench-boot [--arch A] [--runs N] [--kernel [NAME=]PATH] | bench-inject [--arch A] [--runs N] | bench-ghes [--arch A] [--runs N] | bench-host-poison [--arch A] [--runs N] | bench-kho [--gib N] | smp-boots [--runs N]  (A: x86_64 or aarch64)"
            );
            return if args.is_empty() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        Some(other) => Err(format!(
            "unknown command '{other}' (run, suite, merge, demo, shell, bench-boot, bench-inject, bench-ghes, bench-host-poison, bench-kho, smp-boots)"
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

/// Takes `--arch A` (or `--arch=A`) out of a command's arguments: the
/// architecture (x86_64 when not given) and the other arguments, in order.
/// It is taken wherever it stands: `rasvmm run` has no --arch of its own.
fn take_arch(args: &[String]) -> Result<(Arch, Vec<String>), String> {
    let mut arch = Arch::X86_64;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let name = if a == "--arch" {
            it.next().ok_or("--arch needs x86_64 or aarch64")?
        } else if let Some(v) = a.strip_prefix("--arch=") {
            v
        } else {
            rest.push(a.clone());
            continue;
        };
        arch = name.parse().map_err(|e| chain(&e))?;
    }
    Ok((arch, rest))
}

/// Opens the lab for `arch`'s guests on the backend detected for them.
pub fn open_lab(arch: Arch) -> Result<Lab, String> {
    Lab::for_arch(arch).map_err(|e| chain(&e))
}

/// One line saying where guests run: backend and architecture.
pub fn describe(lab: &Lab) -> String {
    format!(
        "backend: {} for {} guests (host KVM: {}); guest kernel {}",
        lab.backend,
        lab.arch,
        lab::host_kvm(),
        lab.manifest.kernel_version
    )
}

fn run(arch: Arch, args: &[String]) -> Result<ExitCode, String> {
    let lab = open_lab(arch)?;
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
        run_limits: Vec::new(),
        silence_limit: None,
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

fn demo(arch: Arch) -> Result<ExitCode, String> {
    let lab = open_lab(arch)?;
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
        .typed()
        .ok()
        .and_then(|v| v.agent_ready_ms)
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

/// `shell [--timeout S] SCRIPT`: runs a shell script where rasvmm runs (the
/// lab host, or this host directly) and prints its output, stdout and
/// stderr together; exits with the script's status.
fn shell(arch: Arch, args: &[String]) -> Result<ExitCode, String> {
    let usage = "shell [--arch A] [--timeout SECONDS] [--file NAME=PATH]... SCRIPT";
    let mut timeout = Duration::from_secs(120);
    let mut script = None;
    let mut files = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--timeout" => {
                let t = it
                    .next()
                    .and_then(|t| t.parse::<f64>().ok())
                    .and_then(|t| vmm::config::parse_timeout(t).ok())
                    .ok_or(format!("--timeout needs seconds ({usage})"))?;
                timeout = t;
            }
            "--file" => {
                let (name, path) = it
                    .next()
                    .and_then(|f| f.split_once('='))
                    .ok_or(format!("--file needs NAME=PATH ({usage})"))?;
                files.push((name.to_string(), std::path::PathBuf::from(path)));
            }
            s if script.is_none() => script = Some(s.to_string()),
            s => return Err(format!("unexpected argument '{s}' ({usage})")),
        }
    }
    let script = script.ok_or(format!("no script ({usage})"))?;
    let lab = open_lab(arch)?;
    eprintln!("{}", describe(&lab));
    let wrapped = format!(
        "( {script}
) >\"$WORK/shell-output\" 2>&1
echo $? >\"$WORK/shell-status\"
         lab_emit output \"$WORK/shell-output\"
lab_emit status \"$WORK/shell-status\"
"
    );
    let res = lab
        .run_shell_with_files(&wrapped, &files, timeout)
        .map_err(|e| chain(&e))?;
    print!("{}", res.files.get("output").map_or("", String::as_str));
    eprintln!("wall time: {:.1} s", res.wall.as_secs_f64());
    let status = res
        .files
        .get("status")
        .and_then(|s| s.trim().parse::<u8>().ok())
        .ok_or("the script's status did not come back")?;
    Ok(ExitCode::from(status))
}

/// An error with its causes on one line.
pub use vmm::report::one_line as chain;

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arch_option_is_taken_out() {
        let (a, rest) = take_arch(&strings(&["--vcpus", "2", "--arch", "aarch64"])).unwrap();
        assert_eq!(a, Arch::Aarch64);
        assert_eq!(rest, strings(&["--vcpus", "2"]));
        let (a, rest) = take_arch(&strings(&["--arch=x86_64", "dir"])).unwrap();
        assert_eq!(a, Arch::X86_64);
        assert_eq!(rest, strings(&["dir"]));
        assert_eq!(take_arch(&[]).unwrap().0, Arch::X86_64);
        assert!(take_arch(&strings(&["--arch"])).is_err());
        assert!(take_arch(&strings(&["--arch", "mips"])).is_err());
    }
}
