//! Running scenario files (see `vmm::scenario`) through a [`Lab`]: one
//! lab-host boot runs them all, each as its own rasvmm run judged by rasvmm.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vmm::scenario::Scenario;

use crate::kernels::{GuestKernel, KernelImages};
use crate::{Error, Job, JobResult, Lab, RunResult, JOB_FILE_PREFIX};

mod output;
mod views;

pub use output::{counts, junit, matrix, progress_line, table};

/// Time each scenario gets beyond its own deadline (boot, report).
const PER_SCENARIO_MARGIN: f64 = 30.0;
/// The built-in x86_64 suite.
pub fn default_dir() -> PathBuf {
    default_dir_for(crate::Arch::X86_64)
}

/// The built-in suite of `arch`: scenarios/<arch>.
pub fn default_dir_for(arch: crate::Arch) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(arch.name());
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// Reads every `*.toml` in `dir`, in name order; the error is one line.
pub fn load_dir(dir: &Path) -> Result<Vec<(PathBuf, Scenario)>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read scenario directory '{}': {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no *.toml scenarios in '{}'", dir.display()));
    }
    files
        .into_iter()
        .map(|f| {
            let s = Scenario::load(&f).map_err(|e| {
                let cause = std::error::Error::source(&e).map(|c| format!(": {c}"));
                format!("{e}{}", cause.unwrap_or_default())
            })?;
            Ok((f, s))
        })
        .collect()
}

/// One scenario's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub name: String,
    /// The guest kernel it ran on.
    pub kernel: String,
    /// CPU profile it ran with.
    pub cpu: String,
    /// How the run ended.
    pub outcome: String,
    /// rasvmm's verdict.
    pub passed: bool,
    /// Why it failed.
    pub failures: Vec<String>,
    /// What the guest kernel lacks of what the scenario requires (its
    /// verdict is then `n/a`: neither passed nor failed).
    #[serde(default)]
    pub not_applicable: Vec<String>,
    /// What the guest kernel offered, by its agent's hello (none if the
    /// agent never said hello).
    #[serde(default)]
    pub features: Option<Vec<guest_agent::KernelFeature>>,
    /// Why an earlier attempt of this scenario did not count (the lab host
    /// stopped under it), if it was retried.
    pub retried: Option<String>,
    /// For a failure: the last console lines and where each vCPU was, from
    /// rasvmm's report, so that a CI log shows the cause, not only the
    /// verdict.
    pub diagnosis: Vec<String>,
    /// rasdaemon's view beside rasvmm's, where the scenario asks for it.
    #[serde(default)]
    pub views: Vec<String>,
    /// Run time, seconds.
    pub seconds: f64,
    /// rasvmm's report (null if it wrote none).
    pub report: Value,
}

/// A scenario's verdict on one kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Every expectation held.
    Passed,
    /// One did not, or the run could not be judged.
    Failed,
    /// The guest kernel lacks what the scenario requires.
    NotApplicable,
}

impl ScenarioResult {
    /// Passed, failed or n/a.
    pub fn status(&self) -> Status {
        if !self.not_applicable.is_empty() {
            Status::NotApplicable
        } else if self.passed {
            Status::Passed
        } else {
            Status::Failed
        }
    }

    /// `PASS`, `FAIL` or `n/a`.
    pub fn label(&self) -> &'static str {
        match self.status() {
            Status::Passed => "PASS",
            Status::Failed => "FAIL",
            Status::NotApplicable => "n/a",
        }
    }
}

/// Fresh lab hosts a suite may use after one stopped under it.
const MAX_LAB_RESTARTS: usize = 3;

/// Runs scenarios in one job; returns their results and the wall time.
///
/// If the lab host stops part-way (it died, or ran out of time), the
/// scenarios that finished keep their results and the rest run in a fresh
/// lab host, the interrupted one first: a lab host that dies is the
/// platform's failure (docs/lab-host.md), so that scenario gets one more
/// attempt, and its result says so (`retried`, shown in the table and as a
/// JUnit `flakyFailure`). If the lab host stops during the retry too, the
/// scenario fails with both reasons: a failure that repeats still fails. At
/// most [`MAX_LAB_RESTARTS`] fresh lab hosts; beyond that the rest fail as
/// not run. Nothing already recorded is lost.
pub fn run(
    lab: &Lab,
    scenarios: &[(PathBuf, Scenario)],
) -> Result<(Vec<ScenarioResult>, f64), Error> {
    run_on(lab, scenarios, &GuestKernel::project(), &mut |_| {})
}

/// Like [`run`], on guest kernel `kernel`, calling `on_result` with each
/// scenario's result as soon as it has finished (progress lines).
pub fn run_on(
    lab: &Lab,
    scenarios: &[(PathBuf, Scenario)],
    kernel: &GuestKernel,
    on_result: &mut dyn FnMut(&ScenarioResult),
) -> Result<(Vec<ScenarioResult>, f64), Error> {
    let images = crate::kernels::images(lab, kernel)?;
    let on = On {
        kernel: &kernel.name,
        images: &images,
    };
    run_with(
        scenarios,
        &on,
        |job, on_run| lab.run_partial_with(job, on_run),
        on_result,
    )
}

/// The kernel a suite job runs on: its name and images.
struct On<'a> {
    kernel: &'a str,
    images: &'a KernelImages,
}

/// Runs `arch`'s built-in suite on that architecture's backend and prints
/// its table; the names of the scenarios that failed (empty if all passed)
/// and the table. An error if the suite cannot load or the lab cannot run.
pub fn run_built_in(arch: crate::Arch) -> Result<(Vec<String>, String), String> {
    let all = load_dir(&default_dir_for(arch))?;
    let chain = |e: &Error| vmm::report::one_line(e);
    let lab = Lab::for_arch(arch).map_err(|e| chain(&e))?;
    crate::progress(&format!(
        "{} {} scenarios on {}",
        all.len(),
        arch.name(),
        lab.backend
    ));
    let (results, _) = run(&lab, &all).map_err(|e| chain(&e))?;
    let t = table(&results);
    crate::progress(&t);
    if results.len() != all.len() {
        return Err(format!(
            "{} of {} scenarios ran\n{t}",
            results.len(),
            all.len()
        ));
    }
    // The project's own build offers every feature its scenarios need: an
    // n/a on it is a failure too.
    let failed = results
        .iter()
        .filter(|r| r.status() != Status::Passed)
        .map(|r| r.name.clone())
        .collect();
    Ok((failed, t))
}

/// [`run`] with the job runner given (tests give a fake lab).
fn run_with(
    scenarios: &[(PathBuf, Scenario)],
    on: &On,
    mut run_job: impl FnMut(&Job, &mut dyn FnMut(usize, &RunResult)) -> Result<JobResult, Error>,
    on_result: &mut dyn FnMut(&ScenarioResult),
) -> Result<(Vec<ScenarioResult>, f64), Error> {
    let mut results = Vec::new();
    let mut wall = 0.0;
    let mut rest = scenarios;
    let mut restarts = 0;
    // Why the first attempt of `rest[0]` ended with the lab host, if it did.
    let mut retrying: Option<String> = None;
    // Why every scenario of this job runs a second time, if it does.
    let mut rerun: Option<String> = None;
    while !rest.is_empty() {
        // A failed clock check makes this job's results the platform's,
        // to be run again (below): they are not reported as they come.
        let may_rerun = rerun.is_none() && restarts < MAX_LAB_RESTARTS;
        let mut spoiled = false;
        let mut finished = |i: usize, r: &RunResult| {
            // Run 0 is the clock check.
            if i == 0 {
                let clock = clock_check(Some(r));
                crate::progress(&clock_line(&clock));
                spoiled = clock.is_err() && may_rerun;
            } else if let Some((_, s)) = rest.get(i - 1).filter(|_| !spoiled) {
                on_result(&judge(s, r, on.kernel));
            }
        };
        let res = run_job(&job(rest, on), &mut finished)?;
        wall += res.wall.as_secs_f64();
        let (check, runs) = match res.runs.split_first() {
            Some((c, r)) => (Some(c), r),
            None => (None, &[][..]),
        };
        let clock = clock_check(check);
        if check.is_none() {
            // Otherwise it was said as soon as it ran.
            crate::progress(&clock_line(&clock));
        }
        if let Err(why) = clock {
            if rerun.is_none() && restarts < MAX_LAB_RESTARTS {
                // This lab host's results would be the platform's: run the
                // same scenarios in a fresh one, and say so on each.
                rerun = Some(format!(
                    "the lab host's guest timers did not run ({why}); ran again in a fresh lab host"
                ));
                restarts += 1;
                continue;
            }
        }
        let done = runs.len().min(rest.len());
        for ((_, s), r) in rest.iter().zip(runs) {
            let mut judged = judge(s, r, on.kernel);
            judged.retried = retrying.take().or_else(|| rerun.clone());
            results.push(judged);
        }
        let Some(why) = res.incomplete else {
            break;
        };
        let why = format!("the lab host stopped during this scenario: {why}");
        match (rest.get(done), retrying.take()) {
            (Some((_, stopped)), Some(first)) => {
                // It stopped during the retry as well.
                let failed =
                    lab_failure(stopped, on.kernel, format!("{first}; on its retry, {why}"));
                on_result(&failed);
                results.push(failed);
                rest = &rest[done + 1..];
            }
            (Some(_), None) => {
                retrying = Some(why);
                rest = &rest[done..];
            }
            (None, _) => rest = &[],
        }
        restarts += 1;
        if restarts > MAX_LAB_RESTARTS && !rest.is_empty() {
            for (i, (_, s)) in rest.iter().enumerate() {
                let not_run = format!("not run: the lab host stopped {restarts} times");
                let why = match (&retrying, i) {
                    (Some(first), 0) => format!("{first}; {not_run} (no retry)"),
                    _ => not_run,
                };
                let failed = lab_failure(s, on.kernel, why);
                on_result(&failed);
                results.push(failed);
            }
            break;
        }
    }
    Ok((results, wall))
}

/// The first run of every suite job: do a guest's timers run at the right
/// speed in this lab host? Now and then a lab host boots in which nested
/// guests' timers stall (docs/lab-host.md): machine-check polls, polled GHES
/// sources and kexec'd kernels then never progress, and every timer-driven
/// scenario fails for the platform's reason. The guest runs `sleep 1`
/// between two agent steps; it passes if the run powers off and the sleep
/// took less than [`CLOCK_CHECK_LIMIT_MS`] by rasvmm's clock.
const CLOCK_CHECK: [&str; 8] = [
    "--timeout",
    "30",
    "--agent",
    "exec:true",
    "--agent",
    "exec:sleep 1",
    "--agent",
    "poweroff",
];

/// The clock check's own deadline, as given in [`CLOCK_CHECK`].
const CLOCK_CHECK_TIMEOUT_S: f64 = 30.0;

/// Longest a guest's `sleep 1` (two agent round trips included) may take
/// in a healthy lab host: about 1.2 s is usual, and a stalled one takes
/// more than 4 s (a 1-second poll timer did not fire within 4 s).
const CLOCK_CHECK_LIMIT_MS: u64 = 3500;

/// Whether the clock check ran as it should in this lab host; the time the
/// guest's `sleep 1` took, when it did.
fn clock_check(r: Option<&RunResult>) -> Result<Option<u64>, String> {
    // The lab host stopped before it: that is handled as a stop.
    let Some(r) = r else { return Ok(None) };
    let report = r.typed()?;
    if report.outcome != vmm::outcome::OutcomeKind::Poweroff {
        return Err(format!("outcome {}", report.outcome.as_str()));
    }
    match (report.steps.first(), report.steps.get(1)) {
        (Some(a), Some(b)) if a.error.is_none() && b.error.is_none() => {
            let ms = b.at_ms.saturating_sub(a.at_ms);
            if ms < CLOCK_CHECK_LIMIT_MS {
                Ok(Some(ms))
            } else {
                Err(format!("a guest's 'sleep 1' took {ms} ms"))
            }
        }
        _ => Err("its steps did not run".into()),
    }
}

/// What the clock check found, on one line.
fn clock_line(clock: &Result<Option<u64>, String>) -> String {
    match clock {
        Ok(Some(ms)) => format!("lab host clock check: a guest's 'sleep 1' took {ms} ms"),
        Ok(None) => "lab host clock check: not run (the lab host stopped)".into(),
        Err(why) => format!("lab host clock check FAILED: {why}"),
    }
}

/// One job running `scenarios` in order, with time for each, after the
/// clock check.
fn job(scenarios: &[(PathBuf, Scenario)], on: &On) -> Job {
    let mut job = Job::default();
    let mut check: Vec<String> = on.images.args.clone();
    check.extend(CLOCK_CHECK.iter().map(|a| a.to_string()));
    job.runs.push(check);
    job.run_limits.push(Duration::from_secs_f64(
        CLOCK_CHECK_TIMEOUT_S + PER_SCENARIO_MARGIN,
    ));
    job.files.extend(on.images.files.iter().cloned());
    let mut budget = 60.0 + CLOCK_CHECK_TIMEOUT_S + PER_SCENARIO_MARGIN;
    for (f, s) in scenarios {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let mut args = match s.guest.image {
            Some(vmm::scenario::GuestImage::Rasdaemon) => on.images.rasdaemon_args.clone(),
            Some(vmm::scenario::GuestImage::Default) | None => on.images.args.clone(),
        };
        args.extend(["--scenario".into(), format!("{JOB_FILE_PREFIX}{name}")]);
        job.runs.push(args);
        job.files.push((name, f.clone()));
        // rasvmm ends the run by its own deadline; past it and the margin,
        // the lab host has stopped (a frozen lab host then costs this, not
        // the whole job's budget).
        let limit =
            s.guest.timeout_s.unwrap_or(vmm::config::DEFAULT_TIMEOUT_S) + PER_SCENARIO_MARGIN;
        job.run_limits.push(Duration::from_secs_f64(limit));
        budget += limit;
    }
    job.timeout = Duration::from_secs_f64(budget);
    job
}

/// A scenario's result from its run: rasvmm's verdict in its report, read
/// as the report's own type.
fn judge(s: &Scenario, r: &RunResult, kernel: &str) -> ScenarioResult {
    let value = r.report.clone().unwrap_or(Value::Null);
    let typed = r.typed();
    let features = typed.as_ref().ok().and_then(|r| r.guest_features.clone());
    let (passed, failures, cpu, seconds, diagnosis, not_applicable) = match &typed {
        Ok(report) => {
            let verdict = report.verdict.clone().unwrap_or_default();
            let diagnosis = if verdict.passed || !verdict.not_applicable.is_empty() {
                Vec::new()
            } else {
                diagnosis(&report.log, &r.stderr)
            };
            (
                verdict.passed,
                verdict.failures,
                report.cpu_profile.clone(),
                report.elapsed_ms as f64 / 1000.0,
                diagnosis,
                verdict.not_applicable,
            )
        }
        Err(e) => (
            false,
            vec![e.clone()],
            "?".to_string(),
            0.0,
            diagnosis(&[], &r.stderr),
            Vec::new(),
        ),
    };
    ScenarioResult {
        name: s.name.clone(),
        kernel: kernel.to_string(),
        not_applicable,
        features,
        cpu,
        outcome: r.outcome().to_string(),
        passed,
        failures,
        retried: None,
        diagnosis,
        views: typed
            .as_ref()
            .map(|report| views::views(s, report))
            .unwrap_or_default(),
        seconds,
        report: value,
    }
}

/// Lines of a failed run's evidence shown under its verdict.
const DIAGNOSIS_LINES: usize = 40;

/// The evidence of a failed run: the last lines of the report's log (the
/// guest console up to the event, and each vCPU's state where rasvmm
/// recorded it), then rasvmm's own stderr.
fn diagnosis(log: &[String], stderr: &str) -> Vec<String> {
    let mut out: Vec<String> = log
        .iter()
        .skip(log.len().saturating_sub(DIAGNOSIS_LINES))
        .map(|l| format!("console/vCPU: {l}"))
        .collect();
    let err: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    out.extend(
        err[err.len().saturating_sub(10)..]
            .iter()
            .map(|l| format!("rasvmm stderr: {l}")),
    );
    out
}

/// A failed result for a scenario the lab host could not finish.
fn lab_failure(s: &Scenario, kernel: &str, why: String) -> ScenarioResult {
    ScenarioResult {
        name: s.name.clone(),
        kernel: kernel.to_string(),
        not_applicable: Vec::new(),
        features: None,
        cpu: s.guest.cpu.clone().unwrap_or_else(|| "?".into()),
        outcome: "lab-host-stopped".into(),
        passed: false,
        failures: vec![why],
        retried: None,
        diagnosis: Vec::new(),
        views: Vec::new(),
        seconds: 0.0,
        report: Value::Null,
    }
}

#[cfg(test)]
mod tests;
