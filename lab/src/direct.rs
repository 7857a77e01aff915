//! Running jobs directly on this host's KVM (hardware KVM of the guests'
//! architecture): each run is a `rasvmm run` child of this process, a shell
//! job `sh` with the same helpers the lab host gives it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::framing::parse_results;
use crate::job::{job_file_name, map_arg, Places};
use crate::{read_json, shell_quote, wait_child, Backend, Error, Job, JobResult, Lab, RunResult};

impl Lab {
    pub(crate) fn run_shell_direct(
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
        wait_child(&mut child, start + timeout, "sh", &path, &mut || None)?;
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

    pub(crate) fn run_direct(
        &self,
        job: &Job,
        on_run: &mut dyn FnMut(usize, &RunResult),
    ) -> Result<JobResult, Error> {
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
            if !args.iter().any(|a| a == "--initramfs") {
                cmd.arg("--initramfs").arg(&self.manifest.guest_initramfs);
            }
            let vmlinux = self.manifest.vmlinux.display().to_string();
            let rasdaemon = self
                .manifest
                .guest_rasdaemon_initramfs
                .display()
                .to_string();
            let places = Places {
                vmlinux: &vmlinux,
                rasdaemon_initramfs: &rasdaemon,
                job_dir: &job_dir,
            };
            let args: Vec<String> = args.iter().map(|a| map_arg(a, &places)).collect();
            let out = cmd
                .arg("--console")
                .arg(&console)
                .arg("--json")
                .arg(&report)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| Error::Spawn(self.manifest.rasvmm.display().to_string(), e))?;
            let run = RunResult {
                exit: out.status.code().unwrap_or(-1),
                report: read_json(&report),
                console: std::fs::read_to_string(&console).unwrap_or_default(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            };
            on_run(i, &run);
            runs.push(run);
        }
        Ok(JobResult {
            backend: Backend::Direct,
            runs,
            wall: start.elapsed(),
            files: BTreeMap::new(),
            incomplete: None,
        })
    }
}
