//! Expectations on what the guest's own tools did: the EINJ requests the
//! guest made through its ACPI error-injection interface, with rasvmm's
//! answers; the status and output of `exec` steps (a lab's shell scripts);
//! and what rasdaemon recorded.

use guest_agent::Command;
use serde::{Deserialize, Serialize};

use crate::steps::Step;

/// Checks an `exec` expectation's key: the 1-based number of an `exec` step.
pub(super) fn check_exec_key(index: &str, steps: &[Step]) -> Result<(), String> {
    let step = crate::steps::number(index)
        .and_then(|i| usize::try_from(i).ok())
        .and_then(|i| i.checked_sub(1))
        .and_then(|i| steps.get(i))
        .map(|s| match s {
            Step::When { step, .. } => step.as_ref(),
            s => s,
        });
    match step {
        Some(Step::Agent {
            cmd: Command::Exec { .. },
            ..
        }) => Ok(()),
        Some(_) => Err(format!(
            "expect.exec.{index}: step {index} is not an exec step"
        )),
        None => Err(format!(
            "expect.exec.{index}: there is no step {index} (the scenario has {})",
            steps.len()
        )),
    }
}

/// One EINJ request the guest made, as an expectation names it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectEinj {
    /// The error type the guest asked for (`0x10`: memory uncorrectable).
    pub error_type: u32,
    /// The page it named, as a reference (accepted requests).
    pub page: Option<String>,
    /// The command status rasvmm answered.
    pub status: ras::einj::CommandStatus,
}

/// What an `exec` step must have returned.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectExec {
    /// Its exit status.
    pub status: Option<i32>,
    /// Substrings its standard output must contain.
    #[serde(default)]
    pub stdout_contains: Vec<String>,
}

/// What rasdaemon must have recorded (the rasdaemon guest image), as the
/// last `rasdaemon` step read it from rasdaemon's database. Each entry must
/// match one of rasdaemon's rows; rasdaemon not running, or recording
/// nothing, fails by name.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRasdaemon {
    /// `mce_record` rows (x86 machine checks).
    #[serde(default)]
    pub mce_record: Vec<ExpectMceRecord>,
    /// `mc_event` rows (EDAC memory errors: GHES CPER records).
    #[serde(default)]
    pub mc_event: Vec<ExpectMcEvent>,
    /// `memory_failure_event` rows.
    #[serde(default)]
    pub memory_failure: Vec<ExpectMemoryFailure>,
}

/// An `mce_record` row.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectMceRecord {
    /// The bank.
    pub bank: Option<u64>,
    /// MCi_STATUS exactly.
    pub status: Option<u64>,
    /// The page (a reference) MCi_ADDR falls in.
    pub page: Option<String>,
}

/// An `mc_event` row.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectMcEvent {
    /// `Corrected`, `Uncorrected`, `Fatal`.
    pub err_type: Option<String>,
    /// The page (a reference) the address falls in.
    pub page: Option<String>,
}

/// A `memory_failure_event` row.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectMemoryFailure {
    /// The page (a reference).
    pub page: String,
    /// The page type as Linux names it (`dirty LRU page`).
    pub page_type: Option<String>,
    /// The action result (`Recovered`, `Ignored`, ...).
    pub action_result: Option<String>,
}
