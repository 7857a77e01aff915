//! What the running kernel offers of what scenarios need
//! ([`KernelFeature`]), found in /proc, /sys and debugfs at start and sent
//! in the hello. Each test looks for the interface a scenario's steps use,
//! not for a kernel version or a config option: distribution kernels
//! backport, and build things as modules.

use std::path::Path;

use guest_agent::KernelFeature;

/// The features the running kernel has, in [`KernelFeature::ALL`] order.
pub fn detect() -> Vec<KernelFeature> {
    KernelFeature::ALL
        .into_iter()
        .filter(|f| present(*f))
        .collect()
}

fn present(f: KernelFeature) -> bool {
    let exists = |p: &str| Path::new(p).exists();
    match f {
        KernelFeature::MemoryFailure => exists("/proc/sys/vm/memory_failure_early_kill"),
        KernelFeature::PanicSysctl => exists("/proc/sys/vm/panic_on_unrecoverable_memory_failure"),
        KernelFeature::MachineCheck => exists("/sys/devices/system/machinecheck"),
        KernelFeature::Ghes => exists("/sys/bus/platform/drivers/GHES"),
        KernelFeature::KexecFile => kexec_file_load_exists(),
        KernelFeature::Kho => exists("/sys/kernel/debug/kho/out"),
        KernelFeature::KhoHwpoison => exists("/sys/kernel/debug/kho/out/sub_fdts/hwpoison"),
        KernelFeature::HwpoisonInject => exists("/sys/kernel/debug/hwpoison/corrupt-pfn"),
        KernelFeature::Einj => exists("/sys/kernel/debug/apei/einj/error_inject"),
    }
}

/// Whether kexec_file_load(2) is built in: called with two descriptors that
/// are not open, it fails with EBADF (or EPERM) if it exists and ENOSYS if
/// it does not; it loads nothing either way.
fn kexec_file_load_exists() -> bool {
    // SAFETY: kexec_file_load(2) with descriptors -1 (never valid), a
    // command line length of 0 and a null command line, and no flags: the
    // kernel rejects the descriptors before it reads anything.
    let r = unsafe {
        libc::syscall(
            crate::SYS_KEXEC_FILE_LOAD,
            -1i32,
            -1i32,
            0usize,
            std::ptr::null::<libc::c_char>(),
            0usize,
        )
    };
    r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}
