//! The lab host's settings, its QEMU machine per architecture and its kernel
//! command line, with the x86_64 TSC rate it is given rather than left to
//! calibrate (docs/lab-host.md).

use std::path::Path;
#[cfg(target_arch = "x86_64")]
use std::time::{Duration, Instant};

use crate::Arch;

/// A lab host setting from the environment (`RASVMM_LAB_ACCEL`,
/// `RASVMM_LAB_CPU_MODEL`, `RASVMM_LAB_CPUS`), else its default. A bad value
/// makes QEMU refuse to start, which is reported with QEMU's stderr.
pub(crate) fn lab_setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

/// The QEMU arguments that make `arch`'s lab host machine: the CPU model
/// (`RASVMM_LAB_CPU_MODEL`, default `max`) and, for aarch64, the virt board
/// with EL2 (so the lab kernel runs KVM with VHE) and a GICv3 (KVM's vGIC).
pub(crate) fn machine_args(arch: Arch) -> Vec<String> {
    let cpu = lab_setting("RASVMM_LAB_CPU_MODEL", "max");
    match arch {
        // TCG's `max` offers SVM, which the lab host's KVM needs.
        Arch::X86_64 => vec!["-cpu".into(), cpu],
        Arch::Aarch64 => vec![
            "-M".into(),
            "virt,virtualization=on,gic-version=3".into(),
            "-cpu".into(),
            cpu,
        ],
    }
}

/// The QEMU arguments that send the lab host's console to `console` and its
/// results channel (see images/lab-init) to `results`: x86_64, the first and
/// second UARTs; aarch64, the virt board's one PL011 and a virtio console on
/// virtio-mmio (the lab's /dev/hvc0).
pub(crate) fn output_args(arch: Arch, console: &Path, results: &Path) -> Vec<String> {
    let serial = |p: &Path| vec!["-serial".into(), format!("file:{}", p.display())];
    match arch {
        Arch::X86_64 => [serial(console), serial(results)].concat(),
        Arch::Aarch64 => [
            serial(console),
            vec![
                "-device".into(),
                "virtio-serial-device".into(),
                "-chardev".into(),
                // QEMU's option syntax: a comma in a value is written twice.
                format!(
                    "file,id=results,path={}",
                    results.display().to_string().replace(',', ",,")
                ),
                "-device".into(),
                "virtconsole,chardev=results".into(),
            ],
        ]
        .concat(),
    }
}

/// The lab host kernel's command line (docs/lab-host.md): the console,
/// `panic=-1` (a lab kernel panic ends QEMU, `-no-reboot`), and
/// `loglevel=5`, which keeps the lab kernel's warnings in the lab console.
/// On x86_64 also:
/// - its TSC rate is given (`tsc_early_khz`), not calibrated: TCG's TSC runs
///   at the host's rate, and the lab kernel's PIT calibration under TCG
///   sometimes fails and lands far enough off that KVM, which takes the
///   early rate for its guests, can no longer give them a correct kvmclock
///   ("user requested TSC rate below hardware speed"); their timers and
///   kexec'd kernels then stall. `tsc=reliable` keeps the clocksource
///   watchdog from discarding the TSC under load for the same reason.
///
/// (The arm64 generic timer has its frequency in CNTFRQ_EL0: nothing to
/// calibrate.) `$RASVMM_LAB_APPEND` is appended, for experiments
/// (`kvm_amd.npt=0`).
pub(crate) fn lab_cmdline(arch: Arch) -> String {
    let mut cmdline = format!("console={} panic=-1 loglevel=5", arch.console());
    if arch == Arch::X86_64 {
        cmdline += " tsc=reliable";
        if let Some(khz) = host_tsc_khz() {
            cmdline += &format!(" tsc_early_khz={khz}");
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_command_line_is_unchanged() {
        if std::env::var_os("RASVMM_LAB_APPEND").is_none() {
            let c = lab_cmdline(Arch::X86_64);
            assert!(c.starts_with("console=ttyS0 panic=-1 loglevel=5 tsc=reliable"));
            assert_eq!(
                lab_cmdline(Arch::Aarch64),
                "console=ttyAMA0 panic=-1 loglevel=5"
            );
        }
    }

    #[test]
    fn results_channel_per_arch() {
        let x = output_args(Arch::X86_64, Path::new("/c"), Path::new("/r"));
        assert_eq!(x, ["-serial", "file:/c", "-serial", "file:/r"]);
        let a = output_args(Arch::Aarch64, Path::new("/c"), Path::new("/a,b"));
        assert_eq!(&a[..2], ["-serial", "file:/c"]);
        assert!(a.contains(&"file,id=results,path=/a,,b".to_string()));
        assert!(a.contains(&"virtconsole,chardev=results".to_string()));
        if std::env::var_os("RASVMM_LAB_CPU_MODEL").is_none() {
            assert_eq!(
                machine_args(Arch::Aarch64),
                ["-M", "virt,virtualization=on,gic-version=3", "-cpu", "max"]
            );
        }
    }
}
