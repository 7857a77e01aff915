//! The lab host's settings and kernel command line, with the TSC rate it is
//! given rather than left to calibrate (docs/lab-host.md).

use std::time::{Duration, Instant};

/// A lab host setting from the environment (`RASVMM_LAB_ACCEL`,
/// `RASVMM_LAB_CPU_MODEL`, `RASVMM_LAB_CPUS`), else its default. A bad value
/// makes QEMU refuse to start, which is reported with QEMU's stderr.
pub(crate) fn lab_setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

/// The lab host kernel's command line (docs/lab-host.md):
/// - its TSC rate is given (`tsc_early_khz`), not calibrated: TCG's TSC runs
///   at the host's rate, and the lab kernel's PIT calibration under TCG
///   sometimes fails and lands far enough off that KVM, which takes the
///   early rate for its guests, can no longer give them a correct kvmclock
///   ("user requested TSC rate below hardware speed"); their timers and
///   kexec'd kernels then stall. `tsc=reliable` keeps the clocksource
///   watchdog from discarding the TSC under load for the same reason;
/// - `loglevel=5` keeps the lab kernel's warnings in the lab console.
///
/// `$RASVMM_LAB_APPEND` is appended, for experiments (`kvm_amd.npt=0`).
pub(crate) fn lab_cmdline() -> String {
    let mut cmdline = String::from("console=ttyS0 panic=-1 loglevel=5 tsc=reliable");
    if let Some(khz) = host_tsc_khz() {
        cmdline += &format!(" tsc_early_khz={khz}");
    }
    if let Ok(extra) = std::env::var("RASVMM_LAB_APPEND") {
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }
    cmdline
}

/// The host's TSC rate in kHz, measured once per process against the
/// monotonic clock over 200 ms (a few ppm); `None` off x86_64 or if the
/// result is implausible.
pub(crate) fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

pub(crate) fn measure_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::_rdtsc;
        let start = Instant::now();
        // SAFETY: RDTSC has no preconditions on x86_64.
        let c0 = unsafe { _rdtsc() };
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: as above.
        let c1 = unsafe { _rdtsc() };
        let ns = start.elapsed().as_nanos();
        let khz = u128::from(c1.checked_sub(c0)?).checked_mul(1_000_000)? / ns.max(1);
        let khz = u64::try_from(khz).ok()?;
        (100_000..=10_000_000).contains(&khz).then_some(khz)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}
