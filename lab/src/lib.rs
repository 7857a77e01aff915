//! The rasvmm lab: run rasvmm jobs where Linux guests can actually run.
//!
//! On a host whose /dev/kvm is hardware virtualization (kvm_intel or
//! kvm_amd), a job runs the host's rasvmm binary directly. Where it is not
//! (this project's CI machines have KVM's PVM backend, about a thousand
//! times too slow for a Linux guest), the job runs inside a *lab host*:
//! QEMU TCG with `-cpu max` booting our own kernel, which has KVM built in
//! and finds SVM in the emulated CPU. The lab host's initramfs carries the
//! static rasvmm, the guest kernel and the guest initramfs; the harness
//! appends the job as one more cpio archive. The job's stdout comes back on
//! the lab's results channel as framed files (see images/lab-init).
//!
//! A lab is for one guest architecture ([`Arch`]): x86_64 guests run in
//! `qemu-system-x86_64 -cpu max`, aarch64 guests in `qemu-system-aarch64 -M
//! virt,virtualization=on,gic-version=3 -cpu max` (KVM with VHE), whose
//! results channel is a virtio console, the virt board having one PL011.
//! Only guests of the host's own architecture can run directly.
//!
//! Everything needed is named by the manifest that scripts/build-images.sh
//! writes per architecture; a missing piece is an error that says what to run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

mod backend;
mod direct;
mod framing;
mod host;
mod job;
pub mod kernels;
mod lab_host;
pub mod matrix;
pub mod scenarios;

pub use backend::{detect_backend, detect_backend_for, host_kvm, Arch, Backend, Manifest};
pub use framing::{parse_results, LabOutput};
pub use job::{
    Job, JobResult, RunResult, JOB_FILE_PREFIX, RASDAEMON_INITRAMFS_PLACEHOLDER,
    VMLINUX_PLACEHOLDER,
};

/// The x86_64 guest kernel's path inside the lab host (see
/// scripts/build-images.sh; [`Arch::lab_guest_kernel`] for every arch).
pub const LAB_GUEST_KERNEL: &str = "/guest/bzImage";
/// The same kernel as an ELF vmlinux, inside the lab host.
pub const LAB_GUEST_VMLINUX: &str = "/guest/vmlinux";
/// The guest initramfs's path inside the lab host.
pub const LAB_GUEST_INITRAMFS: &str = "/guest/initramfs.cpio";
/// The rasdaemon guest initramfs's path inside the lab host.
pub const LAB_GUEST_RASDAEMON_INITRAMFS: &str = "/guest/initramfs-rasdaemon.cpio";

/// Lab host memory: room for several nested guests.
const LAB_MEMORY: &str = "2048";
/// Lab host CPUs (nested guests get at most this many useful vCPUs).
const LAB_CPUS: &str = "2";
/// Time the lab host needs beyond the job: its own boot and power-off.
const LAB_MARGIN: Duration = Duration::from_secs(60);

/// Errors running a job.
#[derive(Debug, Error)]
pub enum Error {
    /// The manifest is missing or incomplete.
    #[error("Lab manifest '{0}' is missing or incomplete: run scripts/build-images.sh first")]
    Manifest(String),
    /// A file the manifest names is gone.
    #[error("'{0}' from the lab manifest does not exist: run scripts/build-images.sh")]
    MissingFile(String),
    /// A process could not be started.
    #[error("Cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    /// File system trouble in the work directory.
    #[error("Lab work directory error at '{0}'")]
    Io(String, #[source] std::io::Error),
    /// A lab host or script did not finish in time.
    #[error("{0} did not finish in time (see {1})")]
    LabTimeout(String, String),
    /// One run of a job overstayed its own limit, or the job sent nothing
    /// for longer than it may: the lab host stopped making progress.
    #[error("{what}: the lab host stopped making progress (see {log})")]
    LabStalled {
        /// What overstayed: "run 3 of the job did not finish within 90 s
        /// of the one before it".
        what: String,
        /// The lab host's console log.
        log: String,
    },
    /// The lab host reported a problem.
    #[error("Lab host error: {0}")]
    Lab(String),
    /// Backend override not understood.
    #[error("RASVMM_BACKEND must be 'lab' or 'direct', got '{0}'")]
    BackendName(String),
    /// Architecture name not understood.
    #[error("Unknown architecture '{0}' (x86_64 or aarch64)")]
    ArchName(String),
    /// The direct backend was asked for guests of another architecture.
    #[error("The direct backend runs {host} guests on this {host} host, not {guest} guests: use the lab host (RASVMM_BACKEND=lab)")]
    DirectArch {
        /// The host's architecture.
        host: String,
        /// The guests' architecture.
        guest: String,
    },
}

/// Runs jobs on a backend, for one guest architecture.
pub struct Lab {
    /// The guests' (and rasvmm's, and the lab host's) architecture.
    pub arch: Arch,
    /// Where jobs run.
    pub backend: Backend,
    /// The images.
    pub manifest: Manifest,
    work: PathBuf,
}

impl Lab {
    /// An x86_64 lab on the detected backend with the default manifest.
    pub fn new() -> Result<Lab, Error> {
        Lab::for_arch(Arch::X86_64)
    }

    /// A lab for `arch`'s guests on the backend detected for them, with
    /// that architecture's default manifest.
    pub fn for_arch(arch: Arch) -> Result<Lab, Error> {
        let backend = detect_backend_for(arch)?;
        Lab::with_arch(arch, backend, &Manifest::default_path_for(arch))
    }

    /// An x86_64 lab on `backend` with the manifest at `manifest`.
    pub fn with(backend: Backend, manifest: &Path) -> Result<Lab, Error> {
        Lab::with_arch(Arch::X86_64, backend, manifest)
    }

    /// A lab for `arch`'s guests on `backend` with the manifest at
    /// `manifest`; the direct backend only for the host's architecture.
    pub fn with_arch(arch: Arch, backend: Backend, manifest: &Path) -> Result<Lab, Error> {
        let backend = backend::check_direct(backend, arch)?;
        let manifest = Manifest::load(manifest)?;
        if backend == Backend::Lab && which(arch.qemu()).is_none() {
            return Err(Error::Lab(format!(
                "{} is not installed (Debian package {}): run scripts/install-deps.sh",
                arch.qemu(),
                arch.qemu_package()
            )));
        }
        // One directory per Lab: a Lab removes its own when dropped, and
        // tests in one process use several at once.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let work = std::env::temp_dir().join(format!("rasvmm-lab-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&work).map_err(|e| Error::Io(work.display().to_string(), e))?;
        Ok(Lab {
            arch,
            backend,
            manifest,
            work,
        })
    }

    /// Runs a job.
    pub fn run(&self, job: &Job) -> Result<JobResult, Error> {
        self.run_partial(job)?.complete()
    }

    /// Like [`Lab::run`], but a lab host that dies or times out part-way
    /// still returns the runs that finished, with the reason in
    /// [`JobResult::incomplete`].
    pub fn run_partial(&self, job: &Job) -> Result<JobResult, Error> {
        self.run_partial_with(job, &mut |_, _| {})
    }

    /// Like [`Lab::run_partial`], calling `on_run` with each run's index
    /// and result as soon as it has finished (from the lab host, while the
    /// job still runs): for progress lines.
    pub fn run_partial_with(
        &self,
        job: &Job,
        on_run: &mut dyn FnMut(usize, &RunResult),
    ) -> Result<JobResult, Error> {
        match self.backend {
            Backend::Direct => self.run_direct(job, on_run),
            Backend::Lab => self.run_lab(job, &self.manifest.lab_initramfs, None, on_run),
        }
    }

    /// Runs a shell script on this lab's backend. The script finds
    /// `$RASVMM`, `$KERNEL` and `$INITRAMFS` set, a scratch directory in
    /// `$WORK`, and `lab_emit <name> <file>` to send files back; returns the
    /// files it emitted. In the lab host it runs as the job; directly, with
    /// sh on this host.
    pub fn run_shell(&self, script: &str, timeout: Duration) -> Result<JobResult, Error> {
        self.run_shell_with_files(script, &[], timeout)
    }

    /// Like [`Lab::run_shell`], with files (name, source path) the script
    /// finds in the directory `$JOB`.
    pub fn run_shell_with_files(
        &self,
        script: &str,
        files: &[(String, PathBuf)],
        timeout: Duration,
    ) -> Result<JobResult, Error> {
        match self.backend {
            Backend::Lab => {
                let prelude = format!(
                    "RASVMM=rasvmm; KERNEL={}; INITRAMFS={LAB_GUEST_INITRAMFS}; WORK=/tmp; JOB=/job\n",
                    self.arch.lab_guest_kernel()
                );
                let job = Job {
                    runs: vec![],
                    timeout,
                    files: files.to_vec(),
                    run_limits: Vec::new(),
                    silence_limit: None,
                };
                self.run_lab(
                    &job,
                    &self.manifest.lab_initramfs,
                    Some(&(prelude + script)),
                    &mut |_, _| {},
                )?
                .complete()
            }
            Backend::Direct => self.run_shell_direct(script, files, timeout),
        }
    }

    /// Runs a shell script in a lab host booted with `initramfs`; returns
    /// the files it emitted with `lab_emit`. Used by the benchmarks, which
    /// measure peers in the same lab host.
    pub fn run_script(
        &self,
        script: &str,
        initramfs: &Path,
        timeout: Duration,
    ) -> Result<JobResult, Error> {
        self.run_script_with_files(script, initramfs, &[], timeout)
    }

    /// Like [`Lab::run_script`], with files (name, source path) the script
    /// finds in /job.
    pub fn run_script_with_files(
        &self,
        script: &str,
        initramfs: &Path,
        files: &[(String, PathBuf)],
        timeout: Duration,
    ) -> Result<JobResult, Error> {
        let job = Job {
            runs: vec![],
            timeout,
            files: files.to_vec(),
            run_limits: Vec::new(),
            silence_limit: None,
        };
        self.run_lab(&job, initramfs, Some(script), &mut |_, _| {})?
            .complete()
    }

    /// Like [`Lab::run_script`], but a lab host that stops part-way, or
    /// emits nothing for `silence`, still returns what the script emitted
    /// until then, with the reason in `incomplete` (for measurements that
    /// count failures, the lab host's own death included).
    pub fn run_script_partial(
        &self,
        script: &str,
        initramfs: &Path,
        timeout: Duration,
        silence: Duration,
    ) -> Result<JobResult, Error> {
        let job = Job {
            runs: vec![],
            timeout,
            files: Vec::new(),
            run_limits: Vec::new(),
            silence_limit: Some(silence),
        };
        self.run_lab(&job, initramfs, Some(script), &mut |_, _| {})
    }

    pub(crate) fn unique_dir(&self, what: &str) -> Result<PathBuf, Error> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = self.work.join(format!("{what}-{n}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).map_err(|e| Error::Io(d.display().to_string(), e))?;
        Ok(d)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("RASVMM_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// The last `n` lines of `text`, joined with " | " for a one-line message.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Waits for `child` until `deadline`; past it, kills it and reports a
/// timeout naming `log`, the file that shows how far it got. `tick` runs
/// every poll; an error from it kills the child and is returned.
fn wait_child(
    child: &mut std::process::Child,
    deadline: Instant,
    what: &str,
    log: &Path,
    tick: &mut dyn FnMut() -> Option<Error>,
) -> Result<std::process::ExitStatus, Error> {
    loop {
        if let Some(e) = tick() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::LabTimeout(
                    what.to_string(),
                    log.display().to_string(),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(Error::Spawn(what.to_string(), e)),
        }
    }
}

fn read_json(p: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
    })
}

/// Quotes a word for sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes `s` to stderr, flushing (for progress lines from tests and tools).
pub fn progress(s: &str) {
    let mut e = std::io::stderr();
    let _ = writeln!(e, "{s}");
    let _ = e.flush();
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn last_lines_make_one_line() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b | c");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn a_stalled_run_ends_the_child_at_once() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let start = Instant::now();
        let mut ticks = 0;
        let res = wait_child(
            &mut child,
            start + Duration::from_secs(60),
            "sleep",
            Path::new("log"),
            &mut || {
                ticks += 1;
                (ticks == 2).then(|| Error::LabStalled {
                    what: "run 3".into(),
                    log: "log".into(),
                })
            },
        );
        assert!(
            matches!(res, Err(Error::LabStalled { ref what, .. }) if what == "run 3"),
            "{res:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        // Killed and reaped.
        assert!(child.try_wait().unwrap().is_some());
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("exec:echo 'hi'"), r"'exec:echo '\''hi'\'''");
    }
}
