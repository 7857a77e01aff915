//! The `rasvmm` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::config::{self, BootSource, ConsoleTarget, VmConfig, DEFAULT_CMDLINE};
use vmm::outcome::OutcomeKind;
use vmm::report::one_line as chain;
use vmm::scenario::Scenario;

/// rasvmm: a KVM VMM for RAS validation of Linux.
#[derive(Parser)]
#[command(name = "rasvmm", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a Linux guest, run agent steps, and report how it ended.
    Run(Box<RunArgs>),
    /// Send one request to a running rasvmm's control API and print the answer
    /// (`events` streams events until the run ends).
    Api(ApiArgs),
    /// Test tool (root): make the host memory behind addresses of a process
    /// (a running rasvmm) fail, through the host kernel's hwpoison-inject,
    /// as a DRAM failure would. The `host-poison` step runs it.
    HostPoison(HostPoisonArgs),
}

#[derive(clap::Args)]
struct HostPoisonArgs {
    /// The process.
    #[arg(long)]
    pid: u32,
    /// A host address in it (repeatable).
    #[arg(long = "addr", required = true, value_parser = address)]
    addrs: Vec<u64>,
}

#[derive(clap::Args)]
struct ApiArgs {
    /// The run's --api-socket.
    #[arg(long)]
    socket: PathBuf,
    /// ledger, kho, state, events, shutdown, a step (inject:srao:<gpa>, poison:<gpa>,
    /// page-info:<pfn>, ...), mce:<vcpu>:<bank>:<status>:<addr>:<misc>:<mcg_status>,
    /// ghes-memory --severity <recoverable|corrected|fatal> --gpa <gpa>
    /// [--source <nmi|gsiv|polled>] [--threshold] [--vcpu <n>],
    /// ghes-raw --source <nmi|gsiv|polled> --record <hex>, or a JSON request.
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    request: Vec<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel image: bzImage or ELF vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Scenario file (TOML): guest settings, steps and the expected verdict;
    /// the exit status is the verdict (0 pass, 1 fail, 5 n/a: the guest
    /// kernel lacks what it requires). See docs/scenarios.md.
    #[arg(long, conflicts_with_all = ["steps", "expect"])]
    scenario: Option<PathBuf>,
    /// Initramfs (cpio archive, optionally compressed).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line, replacing the default.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Appended to the command line.
    #[arg(long)]
    append: Option<String>,
    /// Guest RAM: MiB, or with a suffix M or G.
    #[arg(long, default_value = "256")]
    memory: String,
    /// vCPUs.
    #[arg(long, default_value = "1", value_parser = count)]
    vcpus: u64,
    /// CPU profile: intel or amd on x86_64, host on aarch64.
    #[arg(long, default_value = arch::guest::DEFAULT_PROFILE)]
    cpu: String,
    /// How a consumed poisoned page is reported: synchronously (mce, an
    /// SRAR machine check, on x86_64; sea, a synchronous external abort with
    /// its CPER record, on aarch64), or first through a GHES error source:
    /// ghes-nmi (x86_64), ghes-gsiv, ghes-polled.
    #[arg(long, default_value = arch::ras::SYNCHRONOUS_ERROR)]
    poison_report: String,
    /// Host memory failures: early (rasvmm asks the host kernel to report a
    /// failed page under the guest as soon as it is found, BUS_MCEERR_AO,
    /// and tells the guest action-optional), or late (the guest hears of it
    /// when its access hits the page). See docs/host-poison.md.
    #[arg(long, default_value = "early")]
    host_mce_kill: String,
    /// Firmware tables: acpi (with APEI's error sources), or dt (aarch64: a
    /// device tree only, no APEI).
    #[arg(long, default_value = "acpi")]
    tables: String,
    /// Console: stdout, none, or a file path.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// What a guest reboot does: exit (the run ends: outcome reboot, or
    /// panic after a panic) or restart (the guest boots again on the same
    /// memory, at most 16 boots; a panic ends only its boot when the
    /// command line says panic=N with N > 0). See docs/host-poison.md.
    #[arg(long, default_value = "exit")]
    on_reboot: String,
    /// With --on-reboot restart: poisoned pages stay bad across a reset
    /// (the DRAM did not heal) instead of being replaced by zeroed memory.
    #[arg(long)]
    keep_poison_on_reset: bool,
    /// Seconds before the run ends as a timeout.
    #[arg(long, default_value_t = config::DEFAULT_TIMEOUT_S)]
    timeout: f64,
    /// Step, repeatable, performed in order: agent requests (exec:<sh>,
    /// alloc-page, touch-page:<n>[:write], spin-page:<n>, kernel-pages:<kind>:<n>,
    /// page-info:<pfn|ref>, sysctl:<name>[=<value>], kexec[:<append>],
    /// poweroff, or JSON), inject:<srar|srao|ucna>:<gpa|ref>[:vcpu=<n>][:local],
    /// poison:<gpa|ref>, ghes-memory:<severity>:<gpa|ref>[:source=<s>],
    /// ghes-raw:<source>:<hex>, kho-scan, wait:<ms>, wait-console:<text>,
    /// wait-boot:<n>. See docs/scenarios.md.
    #[arg(long = "step", visible_alias = "agent", value_name = "STEP")]
    steps: Vec<String>,
    /// Serve the control API on this Unix socket (created 0600).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Write the JSON report here ("-" for stdout).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Outcome that counts as success (exit 0); others exit 1.
    #[arg(long)]
    expect: Option<String>,
}

/// Exit status of a scenario the guest kernel cannot run (its verdict is
/// `n/a`): neither a pass (0) nor a failure (1).
const EXIT_NOT_APPLICABLE: u8 = 5;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("{} (see rasvmm --help)", first.trim());
            return ExitCode::from(2);
        }
    };
    match cli.cmd {
        Cmd::Run(args) => match run(*args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::HostPoison(a) => match vmm::host_poison::poison_frames(a.pid, &a.addrs) {
            Ok(pfns) => {
                for (hva, pfn) in a.addrs.iter().zip(pfns) {
                    println!("{}", vmm::host_poison::frame_line(*hva, pfn));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}", chain(&e));
                ExitCode::from(2)
            }
        },
        Cmd::Api(args) => match api(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// One control API request; prints the answer (and, for `events`, every
/// event line until the run ends).
fn api(a: ApiArgs) -> Result<ExitCode, String> {
    use std::io::{BufRead, BufReader, Write};
    use vmm::api::{client_request, line, Answer, Envelope, Request};
    let request = client_request(&a.request.join(" "))?;
    let stream = std::os::unix::net::UnixStream::connect(&a.socket)
        .map_err(|e| format!("cannot connect to '{}': {e}", a.socket.display()))?;
    let subscribe = request == Request::Subscribe;
    let sent = (&stream).write_all(line(&Envelope { id: 1, request }).as_bytes());
    let mut lines = BufReader::new(&stream).lines();
    if let Err(e) = sent {
        // The run may have refused the connection with a line saying why.
        let why = lines
            .next()
            .and_then(Result::ok)
            .and_then(|l| serde_json::from_str::<Answer>(&l).ok())
            .and_then(|a| a.error);
        return Err(why.unwrap_or_else(|| format!("cannot send the request: {e}")));
    }
    let first = lines
        .next()
        .ok_or("the run closed the connection")?
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    let answer: Answer =
        serde_json::from_str(&first).map_err(|e| format!("malformed answer: {e}"))?;
    if let Some(e) = answer.error {
        return Err(e);
    }
    if !subscribe {
        let ok = answer.ok.unwrap_or_default();
        println!("{}", serde_json::to_string_pretty(&ok).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    for l in lines.map_while(Result::ok) {
        println!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A count option: the number grammar of [`vmm::steps::number`].
fn count(s: &str) -> Result<u64, String> {
    vmm::steps::number(s).ok_or_else(|| format!("'{s}' is not a number"))
}

fn address(s: &str) -> Result<u64, String> {
    vmm::steps::number(s).ok_or_else(|| format!("'{s}' is not an address"))
}

fn parse_memory(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], 1),
        _ => (s, 1),
    };
    vmm::steps::number(num)
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid memory size '{s}' (use MiB, or a number with M or G)"))
}

fn run(mut a: RunArgs) -> Result<ExitCode, String> {
    let scenario = match &a.scenario {
        Some(p) => Some(Scenario::load(p).map_err(|e| chain(&e))?),
        None => None,
    };
    if let Some(s) = &scenario {
        // The scenario's guest settings replace the command line's.
        let g = &s.guest;
        if let Some(c) = &g.cpu {
            a.cpu = c.clone();
        }
        if let Some(v) = g.vcpus {
            a.vcpus = v;
        }
        if let Some(m) = g.memory_mib {
            a.memory = m.to_string();
        }
        if let Some(t) = g.timeout_s {
            a.timeout = t;
        }
        if let Some(p) = &g.poison_report {
            a.poison_report = p.clone();
        }
        if let Some(t) = &g.tables {
            a.tables = t.clone();
        }
        if let Some(h) = &g.host_mce_kill {
            a.host_mce_kill = h.clone();
        }
        if let Some(r) = &g.on_reboot {
            a.on_reboot = r.clone();
        }
        if let Some(k) = g.keep_poison_on_reset {
            a.keep_poison_on_reset = k;
        }
        if let Some(extra) = &g.append {
            a.append = Some(match a.append.take() {
                Some(x) => format!("{x} {extra}"),
                None => extra.clone(),
            });
        }
        a.steps = s.steps.clone();
    }
    let memory_mib = parse_memory(&a.memory)?;
    let vcpus = config::check_vcpus(a.vcpus).map_err(|e| e.to_string())?;
    let cpu = config::cpu_profile(&a.cpu).map_err(|e| e.to_string())?;
    let poison_report = config::PoisonReport::parse(&a.poison_report).map_err(|e| e.to_string())?;
    let tables = config::BootTables::parse(&a.tables).map_err(|e| e.to_string())?;
    let host_mce_kill = config::HostMceKill::parse(&a.host_mce_kill).map_err(|e| e.to_string())?;
    let timeout = config::parse_timeout(a.timeout).map_err(|e| e.to_string())?;
    let on_reboot = config::OnReboot::parse(&a.on_reboot).map_err(|e| e.to_string())?;
    if a.keep_poison_on_reset && on_reboot != config::OnReboot::Restart {
        return Err("--keep-poison-on-reset needs --on-reboot restart".into());
    }
    let expect_name = a.expect.as_deref().unwrap_or("poweroff");
    let expect = OutcomeKind::parse(expect_name).ok_or_else(|| {
        format!("unknown outcome '{expect_name}' for --expect (poweroff, reboot, panic, triple-fault, timeout, vmm-error, stopped, host-memory-error, machine-check-shutdown)")
    })?;
    let console = match a.console.as_str() {
        "stdout" => ConsoleTarget::Stdout,
        "none" => ConsoleTarget::Discard,
        p => ConsoleTarget::File(PathBuf::from(p)),
    };
    if a.json.as_deref() == Some(std::path::Path::new("-")) && console == ConsoleTarget::Stdout {
        return Err("--json - needs --console to be a file or none".into());
    }
    let steps = a
        .steps
        .iter()
        .map(|s| vmm::steps::parse(s).map(|step| (s.clone(), step)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let mut cmdline = a.cmdline;
    if let Some(extra) = a.append {
        cmdline = format!("{cmdline} {extra}");
    }
    let cfg = VmConfig {
        boot: BootSource::Linux {
            kernel: a.kernel,
            initramfs: a.initramfs,
            cmdline,
        },
        poison_report,
        tables,
        memory_mib,
        vcpus,
        cpu,
        console,
        timeout,
        host_mce_kill,
        reboot: config::Reboot {
            on_reboot,
            keep_poison_on_reset: a.keep_poison_on_reset,
        },
    };
    cfg.validate(config::host_memory_mib())
        .map_err(|e| e.to_string())?;
    // Open the report file before the guest boots: a path that cannot be
    // written must fail now, not after a long run whose report would be lost.
    let mut report_file = match &a.json {
        Some(p) if p.as_os_str() != "-" => Some(
            std::fs::File::create(p)
                .map_err(|e| format!("cannot write report '{}': {e}", p.display()))?,
        ),
        _ => None,
    };
    let report = vmm::run::run_expecting(&cfg, &steps, scenario.as_ref(), a.api_socket.as_deref())
        .map_err(|e| chain(&e))?;
    eprint!("{}", report.human());
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        match report_file.as_mut() {
            Some(f) => {
                use std::io::Write;
                f.write_all((json + "\n").as_bytes())
                    .map_err(|e| format!("cannot write report '{}': {e}", path.display()))?;
            }
            None => println!("{json}"),
        }
    }
    if let Some(v) = &report.verdict {
        return Ok(if !v.not_applicable.is_empty() {
            ExitCode::from(EXIT_NOT_APPLICABLE)
        } else if v.passed {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    Ok(match report.outcome {
        k if k == expect => ExitCode::SUCCESS,
        OutcomeKind::VmmError => ExitCode::from(2),
        OutcomeKind::HostMemoryError => ExitCode::from(vmm::host_errors::EXIT_HOST_MEMORY_ERROR),
        _ => ExitCode::from(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("256"), Ok(256));
        assert_eq!(parse_memory("2G"), Ok(2048));
        assert_eq!(parse_memory("512M"), Ok(512));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("99999999999999999999G").is_err());
        assert!(parse_memory("").is_err());
        for bad in ["+256", " 256", "256 ", "2_56", "+2G", "-1M", "G"] {
            assert!(parse_memory(bad).is_err(), "{bad:?}");
        }
        assert!(count("+2").is_err());
        assert_eq!(count("2"), Ok(2));
    }
}
