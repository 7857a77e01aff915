//! The aarch64 lab host: `qemu-system-aarch64 -M virt,virtualization=on`
//! booting our arm64 Linux 7.3 Image, which must come up as an aarch64 KVM
//! host with VHE, carry the aarch64 rasvmm, and send its results back on
//! the virtio console.
//!
//! Always the lab backend, whatever this host is: the test is about the lab
//! host itself. The images come from `scripts/build-images.sh aarch64`; a
//! missing piece fails the test with what to run.

use std::sync::OnceLock;
use std::time::Duration;

use lab::{Arch, Backend, JobResult, Lab, Manifest};

/// One lab-host boot for every test here: what the host says about itself.
const SCRIPT: &str = r#"
cut -d' ' -f1 /proc/uptime >"$WORK/uptime"
uname -m >"$WORK/uname"
if [ -c /dev/kvm ]; then echo present; else echo missing; fi >"$WORK/kvm"
dmesg >"$WORK/dmesg"
$RASVMM --version >"$WORK/version" 2>&1
echo "exit $?" >>"$WORK/version"
ls -l "$KERNEL" "$INITRAMFS" >"$WORK/images" 2>&1
lab_emit uptime "$WORK/uptime"
lab_emit uname "$WORK/uname"
lab_emit kvm "$WORK/kvm"
lab_emit dmesg "$WORK/dmesg"
lab_emit version "$WORK/version"
lab_emit images "$WORK/images"
"#;

fn results() -> &'static JobResult {
    static RESULT: OnceLock<Result<JobResult, String>> = OnceLock::new();
    let r = RESULT.get_or_init(|| {
        let e = |e: lab::Error| format!("{e} ({:?})", std::error::Error::source(&e));
        let manifest = Manifest::default_path_for(Arch::Aarch64);
        let lab = Lab::with_arch(Arch::Aarch64, Backend::Lab, &manifest).map_err(e)?;
        lab::progress(&format!("aarch64 lab host ({})", manifest.display()));
        let res = lab.run_shell(SCRIPT, Duration::from_secs(60)).map_err(e)?;
        lab::progress(&format!(
            "aarch64 lab host: job started {} s after its kernel, whole run {:.1} s",
            file(&res, "uptime").trim(),
            res.wall.as_secs_f64()
        ));
        Ok(res)
    });
    match r {
        Ok(r) => r,
        Err(e) => panic!("the aarch64 lab host could not run: {e}"),
    }
}

fn file<'a>(res: &'a JobResult, name: &str) -> &'a str {
    res.files
        .get(name)
        .unwrap_or_else(|| panic!("the lab host sent no '{name}' (got {:?})", res.files.keys()))
}

#[test]
fn lab_host_is_an_aarch64_kvm_host_with_vhe() {
    let res = results();
    assert_eq!(res.backend, Backend::Lab);
    assert_eq!(file(res, "uname").trim(), "aarch64");
    assert_eq!(
        file(res, "kvm").trim(),
        "present",
        "no /dev/kvm in the lab host"
    );
    let dmesg = file(res, "dmesg");
    assert!(
        dmesg.contains("VHE mode initialized"),
        "the lab kernel's KVM did not start in VHE mode; dmesg:\n{dmesg}"
    );
    let images = file(res, "images");
    assert!(
        images.contains("/guest/Image") && images.contains("/guest/initramfs.cpio"),
        "guest images missing in the lab host: {images}"
    );
}

#[test]
fn aarch64_rasvmm_runs_in_the_lab_host() {
    let version = file(results(), "version");
    assert!(
        version.trim_end().ends_with("exit 0") && version.starts_with("rasvmm "),
        "rasvmm --version in the aarch64 lab host: {version}"
    );
}
