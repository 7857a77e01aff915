//! Where jobs run: the backend (rasvmm directly on hardware KVM, or inside
//! the emulated lab host) and the manifest of built images.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::Error;

/// Where jobs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// rasvmm on the host's hardware KVM.
    Direct,
    /// rasvmm inside the emulated lab host.
    Lab,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Direct => "direct (hardware KVM)",
            Backend::Lab => "lab host (QEMU TCG, nested KVM)",
        })
    }
}

/// What the host's KVM is, from /sys/module.
pub fn host_kvm() -> &'static str {
    let m = |n: &str| Path::new("/sys/module").join(n).exists();
    if m("kvm_intel") {
        "kvm_intel"
    } else if m("kvm_amd") {
        "kvm_amd"
    } else if m("kvm_pvm") {
        "kvm_pvm"
    } else if Path::new("/dev/kvm").exists() {
        "unknown"
    } else {
        "none"
    }
}

/// Chooses the backend: `RASVMM_BACKEND` if set, else direct on hardware
/// KVM (kvm_intel/kvm_amd with an openable /dev/kvm), else the lab host.
pub fn detect_backend() -> Result<Backend, Error> {
    match std::env::var("RASVMM_BACKEND").ok().as_deref() {
        Some("lab") => return Ok(Backend::Lab),
        Some("direct") => return Ok(Backend::Direct),
        Some("") | None => {}
        Some(other) => return Err(Error::BackendName(other.into())),
    }
    let hw = matches!(host_kvm(), "kvm_intel" | "kvm_amd");
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    Ok(if hw && usable {
        Backend::Direct
    } else {
        Backend::Lab
    })
}

/// Paths from target/images/manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Guest (and lab-host) bzImage.
    pub kernel: PathBuf,
    /// The same kernel as an ELF vmlinux.
    pub vmlinux: PathBuf,
    /// Kernel source version.
    pub kernel_version: String,
    /// Guest initramfs.
    pub guest_initramfs: PathBuf,
    /// Lab-host initramfs.
    pub lab_initramfs: PathBuf,
    /// Static rasvmm for direct runs.
    pub rasvmm: PathBuf,
    /// Lab-host initramfs with QEMU for benchmarks (`build-images.sh --bench`).
    pub lab_bench_initramfs: Option<PathBuf>,
}

impl Manifest {
    /// The default manifest location: `$RASVMM_MANIFEST`, else
    /// target/images/manifest in the workspace.
    pub fn default_path() -> PathBuf {
        std::env::var_os("RASVMM_MANIFEST").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images/manifest"),
            PathBuf::from,
        )
    }

    /// Loads and checks a manifest.
    pub fn load(path: &Path) -> Result<Manifest, Error> {
        let bad = || Error::Manifest(path.display().to_string());
        let text = std::fs::read_to_string(path).map_err(|_| bad())?;
        let kv: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| kv.get(k).map(|v| v.to_string()).ok_or_else(bad);
        let file = |k: &str| -> Result<PathBuf, Error> {
            let p = PathBuf::from(get(k)?);
            if !p.exists() {
                return Err(Error::MissingFile(p.display().to_string()));
            }
            Ok(p)
        };
        Ok(Manifest {
            kernel: file("kernel")?,
            vmlinux: file("vmlinux")?,
            kernel_version: get("kernel_version")?,
            guest_initramfs: file("guest_initramfs")?,
            lab_initramfs: file("lab_initramfs")?,
            rasvmm: file("rasvmm")?,
            lab_bench_initramfs: kv
                .get("lab_bench_initramfs")
                .map(PathBuf::from)
                .filter(|p| p.exists()),
        })
    }
}
