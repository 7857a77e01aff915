//! Guest kernels for the matrix: which kernels a suite runs on, read from
//! `--kernel [NAME=]PATH` options or a kernels file (scenarios/matrix/), and
//! the images each one needs. A kernel that is not the project's own build
//! gets the same guest initramfs, agent and init, with the kernel itself
//! added as /boot/bzImage (arm64: /boot/Image) so that the guest kexecs
//! into the kernel under test.

use std::path::{Path, PathBuf};

use guest_agent::KernelFeature;
use serde::Deserialize;

use crate::framing::newc_archive;
use crate::{Arch, Error, Lab};

/// Name of the project's own kernel build in tables and reports.
pub const PROJECT_KERNEL: &str = "rasvmm-7.3";

/// One guest kernel of a matrix.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestKernel {
    /// Its column in the table (`debian-6.12-cloud`).
    pub name: String,
    /// The image (bzImage, ELF vmlinux or arm64 Image); none: the
    /// project's own build from the lab manifest.
    pub path: Option<PathBuf>,
    /// The scenarios (by name) it runs; none: all of the suite.
    pub scenarios: Option<Vec<String>>,
    /// What the lab knows this kernel lacks: if set, every run's guest
    /// must report exactly the other features, or the kernel fails the
    /// matrix (a stale entry, or a kernel built differently).
    pub lacks: Option<Vec<KernelFeature>>,
}

impl GuestKernel {
    /// The project's own build, running every scenario.
    pub fn project() -> GuestKernel {
        GuestKernel {
            name: PROJECT_KERNEL.into(),
            path: None,
            scenarios: None,
            lacks: None,
        }
    }

    /// `--kernel [NAME=]PATH` (`default` is the project's build); the name
    /// defaults to the file's name.
    pub fn from_arg(arg: &str) -> Result<GuestKernel, String> {
        if arg == "default" {
            return Ok(GuestKernel::project());
        }
        let (name, path) = match arg.split_once('=') {
            Some((n, p)) => (n.to_string(), PathBuf::from(p)),
            None => {
                let p = PathBuf::from(arg);
                let n = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or(format!("--kernel '{arg}' names no file"))?
                    .to_string();
                (n, p)
            }
        };
        check_name(&name)?;
        if !path.is_file() {
            return Err(format!("kernel '{}' is not a file", path.display()));
        }
        Ok(GuestKernel {
            name,
            path: Some(path),
            scenarios: None,
            lacks: None,
        })
    }
}

/// A kernels file: `[[kernel]]` tables (see docs/kernel-matrix.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KernelsFile {
    kernel: Vec<GuestKernel>,
}

/// Most kernels one matrix may name.
const MAX_KERNELS: usize = 64;

/// Reads a kernels file; relative paths are relative to the file. Every
/// image it names must exist: a missing one is an error naming it (and,
/// for the built-in matrix, the script that fetches it).
pub fn load_file(path: &Path) -> Result<Vec<GuestKernel>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read kernels file '{}': {e}", path.display()))?;
    let file: KernelsFile = toml::from_str(&text)
        .map_err(|e| format!("bad kernels file '{}': {}", path.display(), e.message()))?;
    if file.kernel.is_empty() || file.kernel.len() > MAX_KERNELS {
        return Err(format!(
            "kernels file '{}' must name 1 to {MAX_KERNELS} kernels",
            path.display()
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut out: Vec<GuestKernel> = Vec::new();
    for mut k in file.kernel {
        check_name(&k.name)?;
        if out.iter().any(|o| o.name == k.name) {
            return Err(format!(
                "kernel '{}' is named twice in '{}'",
                k.name,
                path.display()
            ));
        }
        if let Some(p) = &k.path {
            let p = dir.join(p);
            if !p.is_file() {
                return Err(format!(
                    "kernel '{}': '{}' does not exist{}",
                    k.name,
                    p.display(),
                    if p.to_string_lossy().contains("target/images/distro/") {
                        " (scripts/build-images.sh fetches the built-in matrix's distribution kernels)"
                    } else {
                        ""
                    }
                ));
            }
            k.path = Some(p);
        }
        out.push(k);
    }
    Ok(out)
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "kernel name '{name}' must be 1-64 letters, digits or -_.+"
        ))
    }
}

/// The images a kernel's runs need beyond the lab's own: none for the
/// project's build; else the kernel and a guest initramfs that carries it
/// (as job files, with the `rasvmm run` arguments that name them).
pub struct KernelImages {
    /// Arguments added to each run (`--kernel`, `--initramfs`).
    pub args: Vec<String>,
    /// The same for a run that needs the rasdaemon guest image.
    pub rasdaemon_args: Vec<String>,
    /// Job files (name, path).
    pub files: Vec<(String, PathBuf)>,
}

/// Prepares `k`'s images in `lab`'s work directory.
pub fn images(lab: &Lab, k: &GuestKernel) -> Result<KernelImages, Error> {
    let Some(path) = &k.path else {
        return Ok(KernelImages {
            args: Vec::new(),
            rasdaemon_args: vec![
                "--initramfs".into(),
                crate::RASDAEMON_INITRAMFS_PLACEHOLDER.into(),
            ],
            files: Vec::new(),
        });
    };
    let dir = lab.unique_dir("kernel")?;
    let io = |p: &Path, e| Error::Io(p.display().to_string(), e);
    let boot = match lab.arch {
        Arch::X86_64 => "boot/bzImage",
        Arch::Aarch64 => "boot/Image",
    };
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("boot")).map_err(|e| io(&root, e))?;
    std::fs::copy(path, root.join(boot)).map_err(|e| io(path, e))?;
    // Each guest image of the project, then an archive whose /boot kernel
    // replaces the project's (the kernel's unpacker takes the later entry).
    let kernel_archive = newc_archive(&root, &[boot.to_string()])?;
    let kname = format!("kernel-{}", k.name);
    let mut files = vec![(kname.clone(), path.clone())];
    let mut args = Vec::new();
    for (base, iname) in [
        (
            &lab.manifest.guest_initramfs,
            format!("initramfs-{}.cpio", k.name),
        ),
        (
            &lab.manifest.guest_rasdaemon_initramfs,
            format!("initramfs-rasdaemon-{}.cpio", k.name),
        ),
    ] {
        let mut img = std::fs::read(base).map_err(|e| io(base, e))?;
        img.resize(img.len().div_ceil(512) * 512, 0);
        img.extend_from_slice(&kernel_archive);
        let initramfs = dir.join(&iname);
        std::fs::write(&initramfs, img).map_err(|e| io(&initramfs, e))?;
        args.push(vec![
            "--kernel".into(),
            format!("{}{kname}", crate::JOB_FILE_PREFIX),
            "--initramfs".into(),
            format!("{}{iname}", crate::JOB_FILE_PREFIX),
        ]);
        files.push((iname, initramfs));
    }
    let rasdaemon_args = args.pop().unwrap_or_default();
    Ok(KernelImages {
        args: args.pop().unwrap_or_default(),
        rasdaemon_args,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_arguments() {
        assert_eq!(
            GuestKernel::from_arg("default").unwrap().name,
            PROJECT_KERNEL
        );
        let e = GuestKernel::from_arg("x=/nonexistent/bzImage").unwrap_err();
        assert!(e.contains("is not a file"), "{e}");
        let e = GuestKernel::from_arg("a b=/etc/hostname").unwrap_err();
        assert!(e.contains("must be"), "{e}");
        let k = GuestKernel::from_arg("/etc/hostname").unwrap();
        assert_eq!(k.name, "hostname");
        assert_eq!(k.path.as_deref(), Some(Path::new("/etc/hostname")));
    }

    #[test]
    fn kernels_files() {
        let dir = std::env::temp_dir().join(format!("rasvmm-kernels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("img"), b"x").unwrap();
        let f = dir.join("k.toml");
        let write = |t: &str| std::fs::write(&f, t).unwrap();
        write("[[kernel]]\nname = \"own\"\n[[kernel]]\nname = \"d\"\npath = \"img\"\nscenarios = [\"a\"]\nlacks = [\"kho\"]\n");
        let ks = load_file(&f).unwrap();
        assert_eq!(ks[0].path, None);
        assert_eq!(ks[1].path.as_deref(), Some(dir.join("img").as_path()));
        assert_eq!(ks[1].lacks, Some(vec![KernelFeature::Kho]));
        for (text, want) in [
            (
                "[[kernel]]\nname = \"d\"\npath = \"missing\"\n",
                "does not exist",
            ),
            (
                "[[kernel]]\nname = \"d\"\n[[kernel]]\nname = \"d\"\n",
                "named twice",
            ),
            (
                "[[kernel]]\nname = \"d\"\nlacks = [\"warp\"]\n",
                "bad kernels file",
            ),
            ("kernel = []\n", "1 to 64"),
            ("[[kernel]]\nname = \"d\"\ncolour = 1\n", "unknown field"),
        ] {
            write(text);
            let e = load_file(&f).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains('\n'), "{e:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
