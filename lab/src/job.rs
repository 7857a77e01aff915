//! Jobs and their results: what a [`crate::Lab`] runs (one or more rasvmm
//! runs with their arguments and files) and what comes back (each run's
//! report, console and stderr; the files a shell job sends).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm::report::RunReport;

use crate::{Backend, Error};

/// In a job's arguments, stands for the guest kernel as an ELF vmlinux
/// (`--kernel @vmlinux`), wherever the backend keeps it.
pub const VMLINUX_PLACEHOLDER: &str = "@vmlinux";

/// In a job's arguments, stands for the rasdaemon guest initramfs
/// (`--initramfs @rasdaemon-initramfs`), wherever the backend keeps it.
pub const RASDAEMON_INITRAMFS_PLACEHOLDER: &str = "@rasdaemon-initramfs";

/// Where a backend keeps what a job's placeholders name.
pub(crate) struct Places<'a> {
    /// The guest kernel as an ELF vmlinux.
    pub vmlinux: &'a str,
    /// The rasdaemon guest initramfs.
    pub rasdaemon_initramfs: &'a str,
    /// The job's files.
    pub job_dir: &'a str,
}

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
    /// Longest each run may take, counted from the end of the run before
    /// it (the first run's from the job's start in the lab host). A run
    /// past its limit means the lab host stopped making progress (rasvmm
    /// ends every run by its own deadline, its watchdog 10 s after it at
    /// the latest): the job ends there, incomplete, instead of waiting out
    /// [`Job::timeout`]. With limits, the lab host's boot and its power-off
    /// get two minutes each. Runs without an entry have only the job's
    /// limit; so have jobs without limits.
    pub run_limits: Vec<Duration>,
    /// Longest the lab host may send nothing on its results channel (for
    /// scripts that emit as they go): past it, it stopped making progress.
    pub silence_limit: Option<Duration>,
}

impl Job {
    /// A job of one run.
    pub fn one(args: &[&str], timeout: Duration) -> Job {
        Job {
            runs: vec![args.iter().map(|s| s.to_string()).collect()],
            timeout,
            files: Vec::new(),
            run_limits: Vec::new(),
            silence_limit: None,
        }
    }
}

/// Watches a job against [`Job::run_limits`] and [`Job::silence_limit`]:
/// which part of it is under way (the lab host's boot, a run, its
/// power-off), since when, when the lab host last sent anything, and
/// whether something has overstayed. Jobs with neither limit have only the
/// job's own.
#[derive(Debug)]
pub(crate) struct RunDeadlines<'a> {
    limits: &'a [Duration],
    silence: Option<Duration>,
    /// Longest the lab host may take to start the job (its boot) and to
    /// power off after the last run.
    margin: Duration,
    /// The part under way and since when: `None` before the job started,
    /// else the run under way (runs before it have finished).
    run: Option<usize>,
    since: Instant,
    /// Bytes on the results channel so far, and when the last came.
    sent: (u64, Instant),
}

/// What overstayed its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overdue {
    /// The lab host did not start the job.
    Boot(Duration),
    /// Run `.0` did not finish.
    Run(usize, Duration),
    /// The lab host did not power off after the last run.
    PowerOff(Duration),
    /// The job sent nothing for that long.
    Silent(Duration),
}

impl fmt::Display for Overdue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Overdue::Boot(l) => write!(
                f,
                "the lab host did not start the job within {} s",
                l.as_secs()
            ),
            Overdue::Run(i, l) => write!(
                f,
                "run {i} of the job did not finish within {} s of the one before it",
                l.as_secs()
            ),
            Overdue::PowerOff(l) => write!(
                f,
                "the lab host did not power off within {} s of the last run",
                l.as_secs()
            ),
            Overdue::Silent(l) => write!(f, "the job sent nothing for {} s", l.as_secs()),
        }
    }
}

impl<'a> RunDeadlines<'a> {
    pub(crate) fn new(job: &'a Job, margin: Duration, start: Instant) -> Self {
        RunDeadlines {
            limits: &job.run_limits,
            silence: job.silence_limit,
            margin,
            run: None,
            since: start,
            sent: (0, start),
        }
    }

    /// Notes how many bytes the lab host has `sent` on its results channel
    /// (its first is the job's start) and how many runs have `finished` by
    /// `now`; what is past its limit, if anything.
    pub(crate) fn check(&mut self, sent: u64, finished: usize, now: Instant) -> Option<Overdue> {
        if self.limits.is_empty() && self.silence.is_none() {
            return None;
        }
        if sent != self.sent.0 {
            self.sent = (sent, now);
        }
        match self.run {
            None if sent > 0 => (self.run, self.since) = (Some(finished), now),
            Some(run) if finished > run => (self.run, self.since) = (Some(finished), now),
            _ => {}
        }
        let part = match self.run {
            None => Some(Overdue::Boot(self.margin)),
            Some(_) if self.limits.is_empty() => None,
            Some(run) => Some(match self.limits.get(run) {
                Some(l) => Overdue::Run(run, *l),
                None => Overdue::PowerOff(self.margin),
            }),
        };
        let limit = |o: Overdue| match o {
            Overdue::Boot(l) | Overdue::Run(_, l) | Overdue::PowerOff(l) | Overdue::Silent(l) => l,
        };
        if let Some(o) = part.filter(|o| now.saturating_duration_since(self.since) > limit(*o)) {
            return Some(o);
        }
        match self.silence {
            Some(quiet)
                if self.run.is_some() && now.saturating_duration_since(self.sent.1) > quiet =>
            {
                Some(Overdue::Silent(quiet))
            }
            _ => None,
        }
    }
}

/// Replaces the placeholders in one argument: `@vmlinux`,
/// `@rasdaemon-initramfs` and `@job/<name>`.
pub(crate) fn map_arg(arg: &str, places: &Places<'_>) -> String {
    if arg == VMLINUX_PLACEHOLDER {
        places.vmlinux.to_string()
    } else if arg == RASDAEMON_INITRAMFS_PLACEHOLDER {
        places.rasdaemon_initramfs.to_string()
    } else if let Some(name) = arg.strip_prefix(JOB_FILE_PREFIX) {
        format!("{}/{name}", places.job_dir)
    } else {
        arg.to_string()
    }
}

/// Checks a job file name: one path component, no surprises.
pub(crate) fn job_file_name(name: &str) -> Result<&str, Error> {
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
    /// The report as rasvmm's own type; the error says why there is none.
    pub fn typed(&self) -> Result<RunReport, String> {
        let value = self
            .report
            .clone()
            .ok_or_else(|| format!("rasvmm wrote no report: {}", self.stderr.trim()))?;
        serde_json::from_value(value).map_err(|e| format!("rasvmm's report does not parse: {e}"))
    }

    /// The report's outcome, or "none".
    pub fn outcome(&self) -> &'static str {
        self.typed().map_or("none", |r| r.outcome.as_str())
    }
}

impl fmt::Display for RunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "exit {}; rasvmm said:\n{}", self.exit, self.stderr)?;
        match self.typed() {
            Ok(r) => {
                writeln!(f, "outcome: {} ({})", r.outcome.as_str(), r.detail)?;
                // Where each vCPU was, when rasvmm recorded it (a deadline,
                // a triple fault, a VMM error).
                for l in r.log.iter().filter(|l| l.starts_with("rasvmm: ")) {
                    writeln!(f, "  {l}")?;
                }
            }
            Err(e) => writeln!(f, "{e}")?,
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
    pub(crate) fn complete(self) -> Result<Self, Error> {
        match self.incomplete {
            Some(why) => Err(Error::Lab(why)),
            None => Ok(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_map_per_backend() {
        let lab = Places {
            vmlinux: crate::LAB_GUEST_VMLINUX,
            rasdaemon_initramfs: crate::LAB_GUEST_RASDAEMON_INITRAMFS,
            job_dir: "/job",
        };
        assert_eq!(map_arg("@vmlinux", &lab), "/guest/vmlinux");
        assert_eq!(
            map_arg("@rasdaemon-initramfs", &lab),
            "/guest/initramfs-rasdaemon.cpio"
        );
        let direct = Places {
            vmlinux: "/v",
            rasdaemon_initramfs: "/r.cpio",
            job_dir: "/tmp/x",
        };
        assert_eq!(map_arg("@job/a.toml", &direct), "/tmp/x/a.toml");
        assert_eq!(map_arg("@rasdaemon-initramfs", &direct), "/r.cpio");
        assert_eq!(map_arg("--scenario", &lab), "--scenario");
        assert!(job_file_name("10-a.toml").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(job_file_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_part_of_a_job_is_overdue_only_past_its_own_limit() {
        let s = Duration::from_secs;
        let limits = [s(30), s(90)];
        let t0 = Instant::now();
        let job = Job {
            run_limits: limits.to_vec(),
            ..Job::default()
        };
        let mut d = RunDeadlines::new(&job, s(60), t0);
        // The lab host's boot, until it says the job started.
        assert_eq!(d.check(0, 0, t0 + s(59)), None);
        assert_eq!(d.check(0, 0, t0 + s(61)), Some(Overdue::Boot(s(60))));
        // Run 0's clock starts with the job, whenever that is.
        assert_eq!(d.check(1, 0, t0 + s(100)), None);
        assert_eq!(d.check(1, 0, t0 + s(129)), None);
        assert_eq!(d.check(1, 0, t0 + s(131)), Some(Overdue::Run(0, s(30))));
        // Its end restarts the clock for the next run, at its own limit.
        assert_eq!(d.check(1, 1, t0 + s(135)), None);
        assert_eq!(d.check(1, 1, t0 + s(224)), None);
        assert_eq!(d.check(1, 1, t0 + s(226)), Some(Overdue::Run(1, s(90))));
        // After the last run, the power-off.
        assert_eq!(d.check(1, 2, t0 + s(230)), None);
        assert_eq!(d.check(1, 2, t0 + s(291)), Some(Overdue::PowerOff(s(60))));
        assert_eq!(
            Overdue::Run(3, s(90)).to_string(),
            "run 3 of the job did not finish within 90 s of the one before it"
        );
    }

    #[test]
    fn no_limits_never_overdue() {
        let t0 = Instant::now();
        let job = Job::default();
        let mut d = RunDeadlines::new(&job, Duration::from_secs(1), t0);
        assert_eq!(d.check(0, 0, t0 + Duration::from_secs(3600)), None);
        assert_eq!(d.check(10, 5, t0 + Duration::from_secs(3600)), None);
    }

    #[test]
    fn a_script_job_is_overdue_when_silent() {
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let job = Job {
            silence_limit: Some(s(140)),
            ..Job::default()
        };
        let mut d = RunDeadlines::new(&job, s(120), t0);
        assert_eq!(d.check(0, 0, t0 + s(121)), Some(Overdue::Boot(s(120))));
        let mut d = RunDeadlines::new(&job, s(120), t0);
        assert_eq!(d.check(10, 0, t0 + s(100)), None);
        // Every word restarts the silence.
        assert_eq!(d.check(50, 0, t0 + s(230)), None);
        assert_eq!(d.check(50, 0, t0 + s(369)), None);
        assert_eq!(d.check(50, 0, t0 + s(371)), Some(Overdue::Silent(s(140))));
    }
}
