//! Expectations on what the guest's own tools did: the EINJ requests the
//! guest made through its ACPI error-injection interface, with rasvmm's
//! answers, and the status and output of `exec` steps (a lab's shell
//! scripts).

use serde::{Deserialize, Serialize};

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
