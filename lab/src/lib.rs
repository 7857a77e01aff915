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
//! the lab's second UART as framed files (see images/lab-init).
//!
//! Everything needed is named by the manifest that scripts/build-images.sh
//! writes; a missing piece is an error that says what to run.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

pub mod scenarios;

/// The guest kernel's path inside the lab host (see scripts/build-images.sh).
pub const LAB_GUEST_KERNEL: &str = "/guest/bzImage";
/// The same kernel as an ELF vmlinux, inside the lab host.
pub const LAB_GUEST_VMLINUX: &str = "/guest/vmlinux";
/// The guest initramfs's path inside the lab host.
pub const LAB_GUEST_INITRAMFS: &str = "/guest/initramfs.cpio";

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
    /// The lab host reported a problem.
    #[error("Lab host error: {0}")]
    Lab(String),
    /// Backend override not understood.
    #[error("RASVMM_BACKEND must be 'lab' or 'direct', got '{0}'")]
    BackendName(String),
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

/// In a job's arguments, stands for the guest kernel as an ELF vmlinux
/// (`--kernel @vmlinux`), wherever the backend keeps it.
pub const VMLINUX_PLACEHOLDER: &str = "@vmlinux";

/// In a job's arguments, `@job/<name>` names file `<name>` of [`Job::files`]
/// wherever the backend puts it.
pub const JOB_FILE_PREFIX: &str = "@job/";

/// A job: one or more rasvmm runs, each with its own arguments.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// Arguments after `rasvmm run --kernel K --initramfs I`, per run.
    pub runs: Vec<Vec<String>>,
    /// Longest the whole job may take (the lab host's own boot is added).
    pub timeout: Duration,
    /// Files the runs need (name, source path), named `@job/<name>` in arguments.
    pub files: Vec<(String, PathBuf)>,
}

impl Job {
    /// A job of one run.
    pub fn one(args: &[&str], timeout: Duration) -> Job {
        Job {
            runs: vec![args.iter().map(|s| s.to_string()).collect()],
            timeout,
            files: Vec::new(),
        }
    }
}

/// Replaces the placeholders in one argument: `@vmlinux` and `@job/<name>`.
fn map_arg(arg: &str, vmlinux: &str, job_dir: &str) -> String {
    if arg == VMLINUX_PLACEHOLDER {
        vmlinux.to_string()
    } else if let Some(name) = arg.strip_prefix(JOB_FILE_PREFIX) {
        format!("{job_dir}/{name}")
    } else {
        arg.to_string()
    }
}

/// Checks a job file name: one path component, no surprises.
fn job_file_name(name: &str) -> Result<&str, Error> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(name)
    } else {
        Err(Error::Lab(format!(
            "job file name '{name}' must be one plain file name"
        )))
    }
}

/// What one rasvmm run produced.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// rasvmm's exit status.
    pub exit: i32,
    /// The JSON report, if rasvmm wrote one.
    pub report: Option<serde_json::Value>,
    /// Guest console.
    pub console: String,
    /// rasvmm's standard error (its human summary or error line).
    pub stderr: String,
}

impl RunResult {
    /// The report's outcome, or "none".
    pub fn outcome(&self) -> &str {
        self.report
            .as_ref()
            .and_then(|r| r["outcome"].as_str())
            .unwrap_or("none")
    }
}

impl fmt::Display for RunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "exit {}; rasvmm said:\n{}", self.exit, self.stderr)?;
        if let Some(r) = &self.report {
            writeln!(f, "outcome: {} ({})", r["outcome"], r["detail"])?;
            // Where each vCPU was, when rasvmm recorded it (a deadline, a
            // triple fault, a VMM error).
            let log = r["log"].as_array().map(Vec::as_slice).unwrap_or_default();
            for l in log.iter().filter_map(|l| l.as_str()) {
                if l.starts_with("rasvmm: ") {
                    writeln!(f, "  {l}")?;
                }
            }
        }
        let tail: Vec<&str> = self.console.lines().rev().take(40).collect();
        writeln!(f, "guest console (last {} lines):", tail.len())?;
        for l in tail.iter().rev() {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// What a job produced.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// Where it ran.
    pub backend: Backend,
    /// One per run, in order.
    pub runs: Vec<RunResult>,
    /// Wall time of the whole job, lab boot included.
    pub wall: Duration,
    /// Named files the job emitted beyond the runs' (lab jobs only).
    pub files: BTreeMap<String, String>,
    /// Why the job ended before all its runs did (the lab host died or ran
    /// out of time); `runs` then holds only the runs that finished.
    pub incomplete: Option<String>,
}

impl JobResult {
    /// This result, or the reason it is incomplete as an error.
    fn complete(self) -> Result<Self, Error> {
        match self.incomplete {
            Some(why) => Err(Error::Lab(why)),
            None => Ok(self),
        }
    }
}

/// Runs jobs on a backend.
pub struct Lab {
    /// Where jobs run.
    pub backend: Backend,
    /// The images.
    pub manifest: Manifest,
    work: PathBuf,
}

impl Lab {
    /// A lab on the detected backend with the default manifest.
    pub fn new() -> Result<Lab, Error> {
        let backend = detect_backend()?;
        Lab::with(backend, &Manifest::default_path())
    }

    /// A lab on `backend` with the manifest at `manifest`.
    pub fn with(backend: Backend, manifest: &Path) -> Result<Lab, Error> {
        let manifest = Manifest::load(manifest)?;
        if backend == Backend::Lab && which("qemu-system-x86_64").is_none() {
            return Err(Error::Lab(
                "qemu-system-x86_64 is not installed: run scripts/install-deps.sh".into(),
            ));
        }
        // One directory per Lab: a Lab removes its own when dropped, and
        // tests in one process use several at once.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let work = std::env::temp_dir().join(format!("rasvmm-lab-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&work).map_err(|e| Error::Io(work.display().to_string(), e))?;
        Ok(Lab {
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
        match self.backend {
            Backend::Direct => self.run_direct(job),
            Backend::Lab => self.run_lab(job, &self.manifest.lab_initramfs, None),
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
                    "RASVMM=rasvmm; KERNEL={LAB_GUEST_KERNEL}; INITRAMFS={LAB_GUEST_INITRAMFS}; WORK=/tmp; JOB=/job\n"
                );
                let job = Job {
                    runs: vec![],
                    timeout,
                    files: files.to_vec(),
                };
                self.run_lab(
                    &job,
                    &self.manifest.lab_initramfs,
                    Some(&(prelude + script)),
                )?
                .complete()
            }
            Backend::Direct => self.run_shell_direct(script, files, timeout),
        }
    }

    fn run_shell_direct(
        &self,
        script: &str,
        files: &[(String, PathBuf)],
        timeout: Duration,
    ) -> Result<JobResult, Error> {
        let start = Instant::now();
        let dir = self.unique_dir("shell")?;
        for (name, src) in files {
            let dst = dir.join(job_file_name(name)?);
            std::fs::copy(src, &dst).map_err(|e| Error::Io(src.display().to_string(), e))?;
        }
        let prelude = format!(
            "RASVMM={}; KERNEL={}; INITRAMFS={}; WORK={}; JOB={}\n\
             lab_emit() {{ echo \"@@@RASVMM-FILE $1\"; [ -f \"$2\" ] && cat \"$2\"; echo; echo \"@@@RASVMM-END $1\"; }}\n",
            shell_quote(&self.manifest.rasvmm.display().to_string()),
            shell_quote(&self.manifest.kernel.display().to_string()),
            shell_quote(&self.manifest.guest_initramfs.display().to_string()),
            shell_quote(&dir.display().to_string()),
            shell_quote(&dir.display().to_string()),
        );
        let path = dir.join("job.sh");
        std::fs::write(&path, prelude + script + "\necho @@@RASVMM-JOB-DONE\n")
            .map_err(|e| Error::Io(path.display().to_string(), e))?;
        let mut child = Command::new("sh")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Spawn("sh".into(), e))?;
        let mut out = child.stdout.take().map(std::io::BufReader::new);
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(o) = out.as_mut() {
                let _ = std::io::Read::read_to_string(o, &mut s);
            }
            s
        });
        wait_child(&mut child, start + timeout, "sh", &path)?;
        let text = reader.join().unwrap_or_default();
        let parsed = parse_results(&text);
        if !parsed.done {
            return Err(Error::Lab("the script did not complete".into()));
        }
        Ok(JobResult {
            backend: Backend::Direct,
            runs: Vec::new(),
            wall: start.elapsed(),
            files: parsed.files,
            incomplete: None,
        })
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
        let job = Job {
            runs: vec![],
            timeout,
            files: Vec::new(),
        };
        self.run_lab(&job, initramfs, Some(script))?.complete()
    }

    /// Like [`Lab::run_script`], but a lab host that stops part-way still
    /// returns what the script emitted until then, with the reason in
    /// `incomplete` (for measurements that count failures, the lab host's
    /// own death included).
    pub fn run_script_partial(
        &self,
        script: &str,
        initramfs: &Path,
        timeout: Duration,
    ) -> Result<JobResult, Error> {
        let job = Job {
            runs: vec![],
            timeout,
            files: Vec::new(),
        };
        self.run_lab(&job, initramfs, Some(script))
    }

    fn unique_dir(&self, what: &str) -> Result<PathBuf, Error> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = self.work.join(format!("{what}-{n}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).map_err(|e| Error::Io(d.display().to_string(), e))?;
        Ok(d)
    }

    fn run_direct(&self, job: &Job) -> Result<JobResult, Error> {
        let start = Instant::now();
        let dir = self.unique_dir("direct")?;
        for (name, src) in &job.files {
            let dst = dir.join(job_file_name(name)?);
            std::fs::copy(src, &dst).map_err(|e| Error::Io(src.display().to_string(), e))?;
        }
        let job_dir = dir.display().to_string();
        let mut runs = Vec::new();
        for (i, args) in job.runs.iter().enumerate() {
            let console = dir.join(format!("console-{i}.log"));
            let report = dir.join(format!("report-{i}.json"));
            let mut cmd = Command::new(&self.manifest.rasvmm);
            cmd.arg("run");
            if !args.iter().any(|a| a == "--kernel") {
                cmd.arg("--kernel").arg(&self.manifest.kernel);
            }
            let vmlinux = self.manifest.vmlinux.display().to_string();
            let args: Vec<String> = args
                .iter()
                .map(|a| map_arg(a, &vmlinux, &job_dir))
                .collect();
            let out = cmd
                .arg("--initramfs")
                .arg(&self.manifest.guest_initramfs)
                .arg("--console")
                .arg(&console)
                .arg("--json")
                .arg(&report)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| Error::Spawn(self.manifest.rasvmm.display().to_string(), e))?;
            runs.push(RunResult {
                exit: out.status.code().unwrap_or(-1),
                report: read_json(&report),
                console: std::fs::read_to_string(&console).unwrap_or_default(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(JobResult {
            backend: Backend::Direct,
            runs,
            wall: start.elapsed(),
            files: BTreeMap::new(),
            incomplete: None,
        })
    }

    fn run_lab(
        &self,
        job: &Job,
        initramfs: &Path,
        script: Option<&str>,
    ) -> Result<JobResult, Error> {
        let start = Instant::now();
        let dir = self.unique_dir("lab")?;
        let root = dir.join("root");
        std::fs::create_dir_all(&root).map_err(|e| Error::Io(root.display().to_string(), e))?;
        let mut sh = String::new();
        for (i, args) in job.runs.iter().enumerate() {
            let kernel = if args.iter().any(|a| a == "--kernel") {
                String::new()
            } else {
                format!("--kernel {LAB_GUEST_KERNEL}")
            };
            sh += &format!(
                "rasvmm run {kernel} --initramfs {LAB_GUEST_INITRAMFS} \
                 --console /tmp/console-{i}.log --json /tmp/report-{i}.json {} 2>/tmp/stderr-{i}.log\n\
                 echo \"@@@RASVMM-EXIT {i} $?\"\n\
                 lab_emit report-{i} /tmp/report-{i}.json\n\
                 lab_emit console-{i} /tmp/console-{i}.log\n\
                 lab_emit stderr-{i} /tmp/stderr-{i}.log\n",
                args.iter()
                    .map(|a| shell_quote(&map_arg(a, LAB_GUEST_VMLINUX, "/job")))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        if let Some(text) = script {
            sh += text;
        }
        std::fs::write(root.join("job.sh"), sh)
            .map_err(|e| Error::Io(root.display().to_string(), e))?;

        // The lab initramfs, zero-padded so the appended job archive starts
        // aligned (the kernel's unpacker skips zeros between archives).
        let initrd = dir.join("initrd.img");
        let mut img =
            std::fs::read(initramfs).map_err(|e| Error::Io(initramfs.display().to_string(), e))?;
        img.resize(img.len().div_ceil(512) * 512, 0);
        let mut names = vec!["job.sh".to_string()];
        for (name, src) in &job.files {
            let name = job_file_name(name)?;
            let dst = root.join("job").join(name);
            std::fs::create_dir_all(root.join("job"))
                .map_err(|e| Error::Io(root.display().to_string(), e))?;
            std::fs::copy(src, &dst).map_err(|e| Error::Io(src.display().to_string(), e))?;
            names.push(format!("job/{name}"));
        }
        img.extend(newc_archive(&root, &names)?);
        std::fs::write(&initrd, img).map_err(|e| Error::Io(initrd.display().to_string(), e))?;

        let lab_console = dir.join("lab-console.log");
        let qemu_stderr = dir.join("qemu-stderr.log");
        let results = dir.join("results.txt");
        let limit = job.timeout + LAB_MARGIN;
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                &lab_setting("RASVMM_LAB_ACCEL", "tcg"),
                "-cpu",
                // TCG's `max` offers SVM, which the lab host's KVM needs.
                &lab_setting("RASVMM_LAB_CPU_MODEL", "max"),
                "-m",
                LAB_MEMORY,
                "-smp",
                &lab_setting("RASVMM_LAB_CPUS", LAB_CPUS),
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&self.manifest.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(lab_cmdline())
            .arg("-serial")
            .arg(format!("file:{}", lab_console.display()))
            .arg("-serial")
            .arg(format!("file:{}", results.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&qemu_stderr)
                    .map_err(|e| Error::Io(qemu_stderr.display().to_string(), e))?,
            )
            .spawn()
            .map_err(|e| Error::Spawn("qemu-system-x86_64".into(), e))?;
        let waited = wait_child(
            &mut child,
            start + limit,
            "qemu-system-x86_64",
            &lab_console,
        );
        let text = std::fs::read_to_string(&results).unwrap_or_default();
        let parsed = parse_results(&text);
        if let Some(e) = parsed.lab_error {
            return Err(Error::Lab(e));
        }
        let tail = |p: &Path, n| last_lines(&std::fs::read_to_string(p).unwrap_or_default(), n);
        let incomplete = match waited {
            Err(e @ Error::LabTimeout(..)) => Some(format!(
                "{e}; the lab console ends: {}",
                tail(&lab_console, 15)
            )),
            Err(e) => return Err(e),
            Ok(status) if !parsed.done => Some(format!(
                "the lab host stopped before the job completed (QEMU {status}, stderr: '{}'); the lab console ends: {}",
                tail(&qemu_stderr, 3),
                tail(&lab_console, 15)
            )),
            Ok(_) => None,
        };
        let mut files = parsed.files;
        let mut runs = Vec::new();
        // An incomplete job keeps only the runs that finished (in order).
        let finished = if incomplete.is_some() {
            (0..job.runs.len())
                .take_while(|i| parsed.exits.contains_key(i))
                .count()
        } else {
            job.runs.len()
        };
        for i in 0..finished {
            let mut take = |k: &str| files.remove(&format!("{k}-{i}")).unwrap_or_default();
            let report = serde_json::from_str(take("report").trim()).ok();
            runs.push(RunResult {
                exit: parsed.exits.get(&i).copied().unwrap_or(-1),
                report,
                console: take("console"),
                stderr: take("stderr"),
            });
        }
        Ok(JobResult {
            backend: Backend::Lab,
            runs,
            wall: start.elapsed(),
            files,
            incomplete,
        })
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

/// A lab host setting from the environment (`RASVMM_LAB_ACCEL`,
/// `RASVMM_LAB_CPU_MODEL`, `RASVMM_LAB_CPUS`), else its default. A bad value
/// makes QEMU refuse to start, which is reported with QEMU's stderr.
fn lab_setting(name: &str, default: &str) -> String {
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
fn lab_cmdline() -> String {
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
fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

fn measure_tsc_khz() -> Option<u64> {
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

/// Waits for `child` until `deadline`; past it, kills it and reports a
/// timeout naming `log`, the file that shows how far it got.
fn wait_child(
    child: &mut std::process::Child,
    deadline: Instant,
    what: &str,
    log: &Path,
) -> Result<std::process::ExitStatus, Error> {
    loop {
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
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
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

/// The framed output of a lab job.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LabOutput {
    /// Files by name.
    pub files: BTreeMap<String, String>,
    /// rasvmm exit status by run index.
    pub exits: BTreeMap<usize, i32>,
    /// The job ran to its end.
    pub done: bool,
    /// The lab host's own error, if any.
    pub lab_error: Option<String>,
}

/// Parses what a lab job wrote to the results UART.
pub fn parse_results(text: &str) -> LabOutput {
    let mut out = LabOutput::default();
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some((name, body)) = &mut current {
            if line == format!("@@@RASVMM-END {name}") {
                // lab_emit adds a newline after the file; drop it.
                if body.last() == Some(&"") {
                    body.pop();
                }
                let mut s = body.join("\n");
                if !s.is_empty() {
                    s.push('\n');
                }
                out.files.insert(name.clone(), s);
                current = None;
            } else {
                body.push(line);
            }
            continue;
        }
        if let Some(name) = line.strip_prefix("@@@RASVMM-FILE ") {
            current = Some((name.to_string(), Vec::new()));
        } else if let Some(rest) = line.strip_prefix("@@@RASVMM-EXIT ") {
            let mut it = rest.split_whitespace();
            if let (Some(i), Some(c)) = (it.next(), it.next()) {
                if let (Ok(i), Ok(c)) = (i.parse(), c.parse()) {
                    out.exits.insert(i, c);
                }
            }
        } else if line == "@@@RASVMM-JOB-DONE" {
            out.done = true;
        } else if let Some(e) = line.strip_prefix("@@@RASVMM-LAB-ERROR ") {
            out.lab_error = Some(e.to_string());
        }
    }
    out
}

/// A newc cpio archive of `names` (files under `root`), with the trailer.
fn newc_archive(root: &Path, names: &[String]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let mut ino = 1u32;
    let mut dirs: Vec<String> = Vec::new();
    for name in names {
        // Parent directories first.
        let mut acc = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for p in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if !dirs.contains(&acc) {
                dirs.push(acc.clone());
                newc_entry(&mut out, ino, 0o040755, &acc, &[]);
                ino += 1;
            }
        }
        let path = root.join(name);
        let data = std::fs::read(&path).map_err(|e| Error::Io(path.display().to_string(), e))?;
        newc_entry(&mut out, ino, 0o100755, name, &data);
        ino += 1;
    }
    newc_entry(&mut out, 0, 0, "TRAILER!!!", &[]);
    Ok(out)
}

fn newc_entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 1, 0, data.len(), 0, 0, 0, 0, 0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Writes `s` to stderr, flushing (for progress lines from tests and tools).
pub fn progress(s: &str) {
    let mut e = std::io::stderr();
    let _ = writeln!(e, "{s}");
    let _ = e.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_unframed() {
        let text = "noise\n@@@RASVMM-EXIT 0 1\n@@@RASVMM-FILE report-0\n{\"a\":1}\n\n@@@RASVMM-END report-0\n\
                    @@@RASVMM-FILE console-0\nline 1\nline 2\n\n@@@RASVMM-END console-0\n@@@RASVMM-JOB-DONE\n";
        let r = parse_results(text);
        assert!(r.done);
        assert_eq!(r.exits.get(&0), Some(&1));
        assert_eq!(r.files["report-0"], "{\"a\":1}\n");
        assert_eq!(r.files["console-0"], "line 1\nline 2\n");
    }

    #[test]
    fn last_lines_make_one_line() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b | c");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn truncated_results_are_not_done() {
        let r = parse_results("@@@RASVMM-FILE x\nabc\n");
        assert!(!r.done);
        assert!(r.files.is_empty());
        let e = parse_results("@@@RASVMM-LAB-ERROR /dev/kvm is missing\n");
        assert_eq!(e.lab_error.as_deref(), Some("/dev/kvm is missing"));
    }

    #[test]
    fn placeholders_map_per_backend() {
        assert_eq!(
            map_arg("@vmlinux", "/guest/vmlinux", "/job"),
            "/guest/vmlinux"
        );
        assert_eq!(map_arg("@job/a.toml", "/v", "/tmp/x"), "/tmp/x/a.toml");
        assert_eq!(map_arg("--scenario", "/v", "/job"), "--scenario");
        assert!(job_file_name("10-a.toml").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(job_file_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("exec:echo 'hi'"), r"'exec:echo '\''hi'\'''");
    }

    #[test]
    fn newc_headers_are_aligned() {
        let mut out = Vec::new();
        newc_entry(&mut out, 1, 0o100644, "job.sh", b"echo\n");
        assert_eq!(&out[..6], b"070701");
        assert_eq!(out.len() % 4, 0);
        assert_eq!(out.len(), 112 + 8 + 8);
    }
}
