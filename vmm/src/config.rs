//! What a VM is made of, validated before anything is created.
//!
//! Every bound here turns bad user input into a one-line error instead of a
//! failure deep inside KVM or the guest.

use std::path::PathBuf;
use std::time::Duration;

use arch::guest::{self, CpuProfile};
use thiserror::Error;

/// Smallest guest RAM a Linux 7.3 tinyconfig guest with our initramfs boots in.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Largest guest RAM rasvmm accepts (64 GiB); the host must also have it.
pub const MAX_MEMORY_MIB: u64 = 64 << 10;
/// Most vCPUs.
pub const MAX_VCPUS: u8 = guest::MAX_VCPUS;
/// Longest run rasvmm allows.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The default guest command line (this architecture's; see
/// [`arch::guest::DEFAULT_CMDLINE`]).
pub const DEFAULT_CMDLINE: &str = guest::DEFAULT_CMDLINE;

/// Errors in the VM configuration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Guest RAM outside the accepted range.
    #[error("Memory must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB, got {0} MiB")]
    MemoryRange(u64),
    /// More guest RAM than the host has.
    #[error("Memory of {0} MiB exceeds the host's {1} MiB")]
    MemoryHost(u64, u64),
    /// vCPU count outside the accepted range.
    #[error("vCPUs must be 1 to {MAX_VCPUS}, got {0}")]
    Vcpus(u64),
    /// Unknown CPU profile.
    #[error("Unknown CPU profile '{0}' (available: {1})")]
    CpuProfile(String, String),
    /// Timeout zero or beyond the maximum.
    #[error("Timeout must be between 1 s and 24 h")]
    Timeout,
    /// A kernel or initramfs path that cannot be read.
    #[error("Cannot read {what} '{path}': {reason}")]
    File {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The path given.
        path: String,
        /// Why.
        reason: String,
    },
    /// An unknown --tables.
    #[error(
        "Unknown firmware tables '{0}' (acpi, or dt for a device tree without ACPI on aarch64)"
    )]
    Tables(String),
    /// An unknown --on-reboot.
    #[error("Unknown reboot action '{0}' (exit, or restart to boot the guest again)")]
    OnReboot(String),
    /// An unknown --poison-report.
    #[error("Unknown poison report '{0}' ({sync}, or ghes-<source> for one of this architecture's asynchronous GHES sources)", sync = arch::ras::SYNCHRONOUS_ERROR)]
    PoisonReport(String),
    /// An unknown --host-mce-kill.
    #[error("Unknown host memory-error reporting '{0}' (early or late)")]
    HostMceKill(String),
}

/// Where the guest console (COM1) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// rasvmm's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Only the in-memory log used for classification.
    Discard,
}

/// How the guest is booted.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A Linux bzImage or ELF vmlinux with an optional initramfs.
    Linux {
        /// Kernel image.
        kernel: PathBuf,
        /// Initramfs (cpio, optionally compressed).
        initramfs: Option<PathBuf>,
        /// Command line.
        cmdline: String,
    },
    /// A flat 64-bit payload loaded at `load_addr` and entered there in long
    /// mode: for tests of the VMM itself without Linux.
    Payload {
        /// Code and data.
        bytes: Vec<u8>,
        /// Where it is loaded and entered.
        load_addr: u64,
    },
}

/// Which firmware tables describe the machine to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootTables {
    /// ACPI, with the HEST and its GHESv2 error sources (APEI).
    #[default]
    Acpi,
    /// A device tree only (aarch64): no APEI, so no GHES reports and no
    /// SEA records; for guests that do not need them.
    DeviceTree,
}

impl BootTables {
    /// Parses `acpi` or `dt`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "acpi" => Ok(BootTables::Acpi),
            "dt" => Ok(BootTables::DeviceTree),
            _ => Err(ConfigError::Tables(s.to_string())),
        }
    }
}

/// A validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// What to boot.
    pub boot: BootSource,
    /// How a consumed sticky-poison page is reported to the guest.
    pub poison_report: PoisonReport,
    /// The firmware tables the guest gets.
    pub tables: BootTables,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// CPU model.
    pub cpu: &'static CpuProfile,
    /// Console destination.
    pub console: ConsoleTarget,
    /// Deadline for the whole run, from VMM start.
    pub timeout: Duration,
    /// Whether the host kernel reports failed memory early.
    pub host_mce_kill: HostMceKill,
    /// What a guest reboot does.
    pub reboot: Reboot,
}

/// Whether rasvmm asks the host kernel for early memory-failure reports
/// (the host_errors module).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostMceKill {
    /// PR_MCE_KILL_EARLY on the early-report thread: a failed page is
    /// reported (BUS_MCEERR_AO) as soon as the host finds it.
    #[default]
    Early,
    /// No thread asks: the host reports a failed page only when a vCPU's
    /// access hits it (BUS_MCEERR_AR).
    Late,
}

impl HostMceKill {
    /// Parses `early` or `late`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "early" => Ok(HostMceKill::Early),
            "late" => Ok(HostMceKill::Late),
            _ => Err(ConfigError::HostMceKill(s.to_string())),
        }
    }
}

/// Most boots one run makes with `--on-reboot restart`: a guest that
/// reboots again after that ends the run (outcome `reboot-loop`) rather
/// than running to its deadline.
pub const MAX_BOOTS: u32 = 16;

/// What a guest reboot (a reset, or a panic with `panic=N`) does to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Reboot {
    /// End the run, or boot the guest again.
    pub on_reboot: OnReboot,
    /// With `restart`: sticky-poisoned pages stay bad across the reset (the
    /// DRAM did not heal) instead of being replaced by fresh zeroed memory.
    pub keep_poison_on_reset: bool,
}

/// Whether a panic of a kernel with command line `cmdline` is a reboot to
/// boot again through: its last `panic=N` has N > 0, so the kernel waits N
/// seconds and reboots (kernel/panic.c). rasvmm's default command lines say
/// `panic=-1` (reboot at once) to end a run at its panic without waiting,
/// and 0, the kernel's default, waits forever: neither counts.
pub fn panic_reboots(cmdline: &str) -> bool {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("panic="))
        .next_back()
        .and_then(|n| n.parse::<i64>().ok())
        .is_some_and(|n| n > 0)
}

/// What a guest reboot does to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnReboot {
    /// The run ends (outcome `reboot`, or `panic` after a panic).
    #[default]
    Exit,
    /// The machine is rebuilt on the same memory and the guest boots again;
    /// the run goes on (at most [`MAX_BOOTS`] boots).
    Restart,
}

impl OnReboot {
    /// Parses `exit` or `restart`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "exit" => Ok(OnReboot::Exit),
            "restart" => Ok(OnReboot::Restart),
            _ => Err(ConfigError::OnReboot(s.to_string())),
        }
    }
}

/// How rasvmm tells the guest that it accessed a poisoned page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoisonReport {
    /// The architecture's synchronous error on the accessing vCPU: an
    /// action-required machine check (SRAR) on x86_64, a synchronous
    /// external abort with its CPER record on aarch64. Named by
    /// [`arch::ras::SYNCHRONOUS_ERROR`] (`mce`, `sea`).
    #[default]
    Synchronous,
    /// A recoverable CPER record through this GHES error source; an access
    /// the guest does not resolve becomes the synchronous error
    /// (docs/ghes.md).
    Ghes(ras::ghes::Notification),
}

impl PoisonReport {
    /// Parses the synchronous error's name (`mce` on x86_64, `sea` on
    /// aarch64) or `ghes-<source>`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        if s == arch::ras::SYNCHRONOUS_ERROR {
            return Ok(PoisonReport::Synchronous);
        }
        s.strip_prefix("ghes-")
            .and_then(ras::ghes::Notification::parse)
            .filter(|n| arch::ras::has_source(*n) && *n != ras::ghes::Notification::Sea)
            .map(PoisonReport::Ghes)
            .ok_or_else(|| ConfigError::PoisonReport(s.to_string()))
    }

    /// The name [`PoisonReport::parse`] takes.
    pub fn name(self) -> String {
        match self {
            PoisonReport::Synchronous => arch::ras::SYNCHRONOUS_ERROR.to_string(),
            PoisonReport::Ghes(n) => format!("ghes-{}", n.as_str()),
        }
    }
}

impl serde::Serialize for PoisonReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl VmConfig {
    /// Whether a guest panic ends only its boot: `--on-reboot restart` and
    /// a kernel that reboots itself after a panic ([`panic_reboots`]).
    pub fn panic_is_reboot(&self) -> bool {
        self.reboot.on_reboot == OnReboot::Restart
            && matches!(&self.boot, BootSource::Linux { cmdline, .. } if panic_reboots(cmdline))
    }

    /// Checks sizes and counts; `host_mib` is the host's RAM, if known.
    pub fn validate(&self, host_mib: Option<u64>) -> Result<(), ConfigError> {
        check_memory(self.memory_mib, host_mib)?;
        check_vcpus(u64::from(self.vcpus))?;
        check_timeout(self.timeout)?;
        if let BootSource::Linux {
            kernel, initramfs, ..
        } = &self.boot
        {
            check_file("kernel", kernel)?;
            if let Some(i) = initramfs {
                check_file("initramfs", i)?;
            }
        }
        Ok(())
    }
}

/// Checks a guest RAM size.
pub fn check_memory(mib: u64, host_mib: Option<u64>) -> Result<(), ConfigError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(ConfigError::MemoryRange(mib));
    }
    match host_mib {
        Some(h) if mib > h => Err(ConfigError::MemoryHost(mib, h)),
        _ => Ok(()),
    }
}

/// Checks a vCPU count.
pub fn check_vcpus(n: u64) -> Result<u8, ConfigError> {
    match u8::try_from(n) {
        Ok(v) if (1..=MAX_VCPUS).contains(&v) => Ok(v),
        _ => Err(ConfigError::Vcpus(n)),
    }
}

/// A run's deadline when none is given, seconds.
pub const DEFAULT_TIMEOUT_S: f64 = 120.0;

/// A run deadline from seconds as a user gives them (`--timeout`,
/// `timeout_s`), checked: the one place the limit is applied.
pub fn parse_timeout(secs: f64) -> Result<Duration, ConfigError> {
    if !secs.is_finite() || secs <= 0.0 {
        return Err(ConfigError::Timeout);
    }
    let t = Duration::try_from_secs_f64(secs).map_err(|_| ConfigError::Timeout)?;
    check_timeout(t)?;
    Ok(t)
}

/// Checks a run deadline.
pub fn check_timeout(t: Duration) -> Result<(), ConfigError> {
    if t.is_zero() || t > MAX_TIMEOUT {
        return Err(ConfigError::Timeout);
    }
    Ok(())
}

/// Looks up a CPU profile by name.
pub fn cpu_profile(name: &str) -> Result<&'static CpuProfile, ConfigError> {
    guest::profile(name)
        .ok_or_else(|| ConfigError::CpuProfile(name.into(), guest::profile_names().join(", ")))
}

fn check_file(what: &'static str, path: &PathBuf) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(err("file is empty".into()));
    }
    Ok(())
}

/// The host's RAM in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = m
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_bounds() {
        assert!(check_memory(256, Some(1024)).is_ok());
        assert_eq!(check_memory(0, None), Err(ConfigError::MemoryRange(0)));
        assert_eq!(check_memory(63, None), Err(ConfigError::MemoryRange(63)));
        assert_eq!(
            check_memory(MAX_MEMORY_MIB + 1, None),
            Err(ConfigError::MemoryRange(MAX_MEMORY_MIB + 1))
        );
        assert_eq!(
            check_memory(2048, Some(1024)),
            Err(ConfigError::MemoryHost(2048, 1024))
        );
    }

    #[test]
    fn host_mce_kill_names() {
        assert_eq!(HostMceKill::parse("early"), Ok(HostMceKill::Early));
        assert_eq!(HostMceKill::parse("late"), Ok(HostMceKill::Late));
        assert_eq!(
            HostMceKill::parse("EARLY").unwrap_err().to_string(),
            "Unknown host memory-error reporting 'EARLY' (early or late)"
        );
    }

    #[test]
    fn vcpu_bounds() {
        assert_eq!(check_vcpus(2), Ok(2));
        assert_eq!(check_vcpus(0), Err(ConfigError::Vcpus(0)));
        assert_eq!(check_vcpus(33), Err(ConfigError::Vcpus(33)));
        assert_eq!(check_vcpus(1 << 40), Err(ConfigError::Vcpus(1 << 40)));
    }

    #[test]
    fn timeouts() {
        assert!(check_timeout(Duration::from_secs(1)).is_ok());
        assert_eq!(check_timeout(Duration::ZERO), Err(ConfigError::Timeout));
        assert_eq!(parse_timeout(1.5), Ok(Duration::from_millis(1500)));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 86_400.5, 1e300] {
            assert_eq!(parse_timeout(bad), Err(ConfigError::Timeout), "{bad}");
        }
        assert_eq!(
            check_timeout(MAX_TIMEOUT + Duration::from_secs(1)),
            Err(ConfigError::Timeout)
        );
    }

    #[test]
    fn panic_timeouts_from_the_command_line() {
        assert!(panic_reboots("console=ttyS0 panic=1"));
        assert!(panic_reboots("panic=-1 quiet panic=10"));
        // rasvmm's own convention: end the run at the panic.
        assert!(!panic_reboots(DEFAULT_CMDLINE));
        assert!(!panic_reboots("panic=-1 quiet"));
        assert!(!panic_reboots("console=ttyS0"));
        assert!(!panic_reboots("panic=0"));
        // The last one counts, as the kernel parses them in order.
        assert!(!panic_reboots("panic=5 panic=0"));
        assert!(panic_reboots("panic=0 panic=5"));
        // Not a panic= parameter, or not a number.
        assert!(!panic_reboots("oops=panic panic_on_warn=1"));
        assert!(!panic_reboots("panic=soon"));
    }

    #[test]
    fn a_panic_is_a_reboot_only_with_restart_and_a_panic_timeout() {
        let cfg = |cmdline: &str, on_reboot| VmConfig {
            boot: BootSource::Linux {
                kernel: PathBuf::from("bzImage"),
                initramfs: None,
                cmdline: cmdline.into(),
            },
            poison_report: PoisonReport::default(),
            tables: BootTables::default(),
            memory_mib: 256,
            vcpus: 1,
            cpu: cpu_profile(guest::DEFAULT_PROFILE).unwrap(),
            console: ConsoleTarget::Discard,
            timeout: Duration::from_secs(10),
            host_mce_kill: HostMceKill::default(),
            reboot: Reboot {
                on_reboot,
                keep_poison_on_reset: false,
            },
        };
        let with = format!("{DEFAULT_CMDLINE} panic=1");
        assert!(cfg(&with, OnReboot::Restart).panic_is_reboot());
        assert!(!cfg(&with, OnReboot::Exit).panic_is_reboot());
        assert!(!cfg(DEFAULT_CMDLINE, OnReboot::Restart).panic_is_reboot());
    }

    #[test]
    fn reboot_actions() {
        assert_eq!(OnReboot::parse("exit"), Ok(OnReboot::Exit));
        assert_eq!(OnReboot::parse("restart"), Ok(OnReboot::Restart));
        assert_eq!(OnReboot::default(), OnReboot::Exit);
        let e = OnReboot::parse("Restart").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unknown reboot action 'Restart' (exit, or restart to boot the guest again)"
        );
    }

    #[test]
    fn profiles() {
        assert!(cpu_profile("amd").is_ok());
        let e = cpu_profile("max").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unknown CPU profile 'max' (available: intel, amd)"
        );
    }

    #[test]
    fn missing_and_empty_files() {
        let e = check_file("kernel", &PathBuf::from("/nonexistent/bzImage")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("Cannot read kernel '/nonexistent/bzImage': "));
        let empty = std::env::temp_dir().join(format!("rasvmm-empty-{}", std::process::id()));
        std::fs::write(&empty, b"").unwrap();
        let e = check_file("initramfs", &empty).unwrap_err();
        assert!(e.to_string().ends_with("file is empty"));
        std::fs::remove_file(empty).unwrap();
        assert!(check_file("kernel", &PathBuf::from("/")).is_err());
    }
}
