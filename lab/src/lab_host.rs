//! Running jobs in the lab host: QEMU TCG booting the lab kernel with the
//! job appended to its initramfs, the results channel read run by run as
//! the job goes, and each part of the job (the lab host's boot, each run,
//! its power-off) held to its limit ([`crate::job::RunDeadlines`]).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::framing::{newc_archive, parse_results, take_run, RunsSoFar};
use crate::host::{lab_cmdline, lab_setting, machine_args, output_args};
use crate::job::{job_file_name, map_arg, Places, RunDeadlines};
use crate::{
    last_lines, shell_quote, wait_child, Backend, Error, Job, JobResult, Lab, RunResult, LAB_CPUS,
    LAB_GUEST_INITRAMFS, LAB_GUEST_RASDAEMON_INITRAMFS, LAB_MARGIN, LAB_MEMORY,
    VMLINUX_PLACEHOLDER,
};

impl Lab {
    pub(crate) fn run_lab(
        &self,
        job: &Job,
        initramfs: &Path,
        script: Option<&str>,
        on_run: &mut dyn FnMut(usize, &RunResult),
    ) -> Result<JobResult, Error> {
        let start = Instant::now();
        let dir = self.unique_dir("lab")?;
        let root = dir.join("root");
        std::fs::create_dir_all(&root).map_err(|e| Error::Io(root.display().to_string(), e))?;
        let mut sh = String::new();
        let vmlinux = match self.arch.lab_guest_vmlinux() {
            Some(v) => v,
            None if job.runs.iter().flatten().any(|a| a == VMLINUX_PLACEHOLDER) => {
                return Err(Error::Lab(format!(
                    "the {} images carry no ELF vmlinux ({VMLINUX_PLACEHOLDER})",
                    self.arch
                )))
            }
            None => "",
        };
        let places = Places {
            vmlinux,
            rasdaemon_initramfs: LAB_GUEST_RASDAEMON_INITRAMFS,
            job_dir: "/job",
        };
        for (i, args) in job.runs.iter().enumerate() {
            let given = |opt: &str| args.iter().any(|a| a == opt);
            let kernel = if given("--kernel") {
                String::new()
            } else {
                format!("--kernel {}", self.arch.lab_guest_kernel())
            };
            let initrd = if given("--initramfs") {
                String::new()
            } else {
                format!("--initramfs {LAB_GUEST_INITRAMFS}")
            };
            sh += &format!(
                "rasvmm run {kernel} {initrd} \
                 --console /tmp/console-{i}.log --json /tmp/report-{i}.json {} 2>/tmp/stderr-{i}.log\n\
                 echo \"@@@RASVMM-EXIT {i} $?\"\n\
                 lab_emit report-{i} /tmp/report-{i}.json\n\
                 lab_emit console-{i} /tmp/console-{i}.log\n\
                 lab_emit stderr-{i} /tmp/stderr-{i}.log\n",
                args.iter()
                    .map(|a| shell_quote(&map_arg(a, &places)))
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
        let qemu = self.arch.qemu();
        let mut child = Command::new(qemu)
            .args(["-accel", &lab_setting("RASVMM_LAB_ACCEL", "tcg")])
            .args(machine_args(self.arch))
            .args([
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
            .arg(lab_cmdline(self.arch))
            .args(output_args(self.arch, &lab_console, &results))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&qemu_stderr)
                    .map_err(|e| Error::Io(qemu_stderr.display().to_string(), e))?,
            )
            .spawn()
            .map_err(|e| Error::Spawn(qemu.into(), e))?;
        let mut progress = RunsSoFar::new(&results);
        // The lab host's boot may take the job's margin, and as long again
        // on a slow machine; so may its power-off.
        let mut deadlines = RunDeadlines::new(job, 2 * LAB_MARGIN, start);
        let waited = wait_child(&mut child, start + limit, qemu, &lab_console, &mut || {
            progress.poll(on_run);
            // The lab host's first word on the results channel is the
            // job's start (images/lab-init).
            let sent = std::fs::metadata(&results).map_or(0, |m| m.len());
            let what = deadlines
                .check(sent, progress.finished(), Instant::now())?
                .to_string();
            Some(Error::LabStalled {
                what,
                log: lab_console.display().to_string(),
            })
        });
        progress.poll(on_run);
        let text = std::fs::read_to_string(&results).unwrap_or_default();
        let parsed = parse_results(&text);
        if let Some(e) = parsed.lab_error {
            return Err(Error::Lab(e));
        }
        let tail = |p: &Path, n| last_lines(&std::fs::read_to_string(p).unwrap_or_default(), n);
        let incomplete = match waited {
            // Every run and the script finished: only the power-off hung.
            Err(Error::LabTimeout(..) | Error::LabStalled { .. }) if parsed.done => None,
            Err(e @ (Error::LabTimeout(..) | Error::LabStalled { .. })) => Some(format!(
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
        // An incomplete job keeps only the runs that finished (in order),
        // all their files sent: a run cut off while sending them is the
        // one the lab host stopped in.
        let finished = if incomplete.is_some() {
            (0..job.runs.len())
                .take_while(|i| parsed.exits.contains_key(i))
                .count()
                .min(progress.finished())
        } else {
            job.runs.len()
        };
        for i in 0..finished {
            runs.push(take_run(&mut files, &parsed.exits, i));
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
