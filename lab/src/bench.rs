//! Benchmarks: rasvmm against QEMU in the same lab host run.
use std::process::ExitCode;

/// Boot-to-agent-ready: rasvmm vs QEMU.
pub fn boot(_args: &[String]) -> Result<ExitCode, String> {
    Err("bench-boot: not built yet".into())
}
