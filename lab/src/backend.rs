//! Where jobs run: the guest architecture, the backend (rasvmm directly on
//! hardware KVM, or inside the emulated lab host) and the manifest of built
//! images.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::Error;

/// The architecture of the guests (and so of rasvmm and of the lab host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86_64: the lab host is `qemu-system-x86_64 -cpu max` (SVM).
    X86_64,
    /// aarch64: the lab host is `qemu-system-aarch64 -M virt,virtualization=on`
    /// (KVM with VHE at EL2).
    Aarch64,
}

impl Arch {
    /// Every architecture, in a stable order.
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The architecture this program was built for, if it is one of ours.
    pub fn host() -> Option<Arch> {
        if cfg!(target_arch = "x86_64") {
            Some(Arch::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Arch::Aarch64)
        } else {
            None
        }
    }

    /// Its name, as `uname -m` and Rust's target triples spell it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The QEMU that emulates it as the lab host.
    pub fn qemu(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// The Debian package that brings [`Arch::qemu`].
    pub fn qemu_package(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86",
            Arch::Aarch64 => "qemu-system-arm",
        }
    }

    /// The lab host's console device, for its kernel command line.
    pub fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// The guest kernel's path inside the lab host (scripts/build-images.sh).
    pub fn lab_guest_kernel(self) -> &'static str {
        match self {
            Arch::X86_64 => super::LAB_GUEST_KERNEL,
            Arch::Aarch64 => "/guest/Image",
        }
    }

    /// The guest kernel as an ELF vmlinux inside the lab host, where the
    /// images carry one (x86_64: linux-loader boots arm64 kernels as Image).
    pub fn lab_guest_vmlinux(self) -> Option<&'static str> {
        match self {
            Arch::X86_64 => Some(super::LAB_GUEST_VMLINUX),
            Arch::Aarch64 => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = Error;

    fn from_str(s: &str) -> Result<Arch, Error> {
        match s {
            "x86_64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            other => Err(Error::ArchName(other.into())),
        }
    }
}

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

/// What the host's KVM is, from /sys/module (on arm64 KVM has no vendor
/// module: "kvm" when /dev/kvm exists).
pub fn host_kvm() -> &'static str {
    let m = |n: &str| Path::new("/sys/module").join(n).exists();
    if cfg!(target_arch = "aarch64") && Path::new("/dev/kvm").exists() {
        "kvm"
    } else if m("kvm_intel") {
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

/// Chooses the backend for x86_64 guests: see [`detect_backend_for`].
pub fn detect_backend() -> Result<Backend, Error> {
    detect_backend_for(Arch::X86_64)
}

/// Chooses the backend for `arch`'s guests: `RASVMM_BACKEND` if set (direct
/// only on a host of that architecture), else direct on a host of that
/// architecture with hardware KVM (kvm_intel/kvm_amd, or arm64's KVM, with an
/// openable /dev/kvm), else the lab host.
pub fn detect_backend_for(arch: Arch) -> Result<Backend, Error> {
    let same_arch = Arch::host() == Some(arch);
    match std::env::var("RASVMM_BACKEND").ok().as_deref() {
        Some("lab") => return Ok(Backend::Lab),
        Some("direct") => return check_direct(Backend::Direct, arch),
        Some("") | None => {}
        Some(other) => return Err(Error::BackendName(other.into())),
    }
    if !same_arch {
        return Ok(Backend::Lab);
    }
    let hw = matches!(host_kvm(), "kvm_intel" | "kvm_amd" | "kvm");
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

/// `backend` if it can run `arch`'s guests here: the direct backend runs the
/// host's own rasvmm, so only guests of the host's architecture.
pub(crate) fn check_direct(backend: Backend, arch: Arch) -> Result<Backend, Error> {
    match (backend, Arch::host()) {
        (Backend::Direct, host) if host != Some(arch) => Err(Error::DirectArch {
            host: host.map_or(std::env::consts::ARCH, Arch::name).to_string(),
            guest: arch.name().to_string(),
        }),
        _ => Ok(backend),
    }
}

/// Paths from an architecture's manifest (target/images/manifest for
/// x86_64, target/images/aarch64/manifest for aarch64).
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Guest (and lab-host) kernel: bzImage (x86_64), Image (aarch64).
    pub kernel: PathBuf,
    /// The same kernel as an ELF vmlinux.
    pub vmlinux: PathBuf,
    /// Kernel source version.
    pub kernel_version: String,
    /// Guest initramfs.
    pub guest_initramfs: PathBuf,
    /// The rasdaemon guest initramfs (the guest initramfs with rasdaemon).
    pub guest_rasdaemon_initramfs: PathBuf,
    /// Lab-host initramfs.
    pub lab_initramfs: PathBuf,
    /// Static rasvmm for direct runs.
    pub rasvmm: PathBuf,
    /// Lab-host initramfs with QEMU for benchmarks (`build-images.sh --bench`).
    pub lab_bench_initramfs: Option<PathBuf>,
}

impl Manifest {
    /// The default x86_64 manifest: see [`Manifest::default_path_for`].
    pub fn default_path() -> PathBuf {
        Manifest::default_path_for(Arch::X86_64)
    }

    /// The default manifest location for `arch`: `$RASVMM_MANIFEST`
    /// (x86_64) or `$RASVMM_MANIFEST_AARCH64`, else the one
    /// scripts/build-images.sh writes: target/images/manifest (x86_64) or
    /// target/images/aarch64/manifest.
    pub fn default_path_for(arch: Arch) -> PathBuf {
        let (var, rel) = match arch {
            Arch::X86_64 => ("RASVMM_MANIFEST", "../target/images/manifest"),
            Arch::Aarch64 => (
                "RASVMM_MANIFEST_AARCH64",
                "../target/images/aarch64/manifest",
            ),
        };
        std::env::var_os(var).map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join(rel),
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
            guest_rasdaemon_initramfs: file("guest_rasdaemon_initramfs")?,
            lab_initramfs: file("lab_initramfs")?,
            rasvmm: file("rasvmm")?,
            lab_bench_initramfs: kv
                .get("lab_bench_initramfs")
                .map(PathBuf::from)
                .filter(|p| p.exists()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_round_trip() {
        for a in Arch::ALL {
            assert_eq!(a.name().parse::<Arch>().unwrap(), a);
            assert_eq!(a.to_string(), a.name());
        }
        assert_eq!("arm64".parse::<Arch>().unwrap(), Arch::Aarch64);
        assert!(matches!("riscv64".parse::<Arch>(), Err(Error::ArchName(n)) if n == "riscv64"));
    }

    #[test]
    fn direct_only_for_the_host_arch() {
        let host = Arch::host().unwrap();
        let other = Arch::ALL.into_iter().find(|a| *a != host).unwrap();
        assert_eq!(
            check_direct(Backend::Direct, host).unwrap(),
            Backend::Direct
        );
        assert!(matches!(
            check_direct(Backend::Direct, other),
            Err(Error::DirectArch { .. })
        ));
        assert_eq!(check_direct(Backend::Lab, other).unwrap(), Backend::Lab);
    }

    #[test]
    fn manifests_per_arch() {
        let x = Manifest::default_path_for(Arch::X86_64);
        let a = Manifest::default_path_for(Arch::Aarch64);
        if std::env::var_os("RASVMM_MANIFEST").is_none() {
            assert!(x.ends_with("target/images/manifest"));
        }
        if std::env::var_os("RASVMM_MANIFEST_AARCH64").is_none() {
            assert!(a.ends_with("target/images/aarch64/manifest"));
        }
        assert_eq!(Arch::Aarch64.lab_guest_kernel(), "/guest/Image");
        assert_eq!(Arch::X86_64.lab_guest_kernel(), "/guest/bzImage");
        assert!(Arch::Aarch64.lab_guest_vmlinux().is_none());
    }
}
