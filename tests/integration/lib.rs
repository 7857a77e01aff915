//! rasvmm's integration tests live in tests/: they boot real Linux guests
//! through the `lab` harness (hardware KVM directly, else the lab host).
//! A missing prerequisite (images, QEMU) fails the tests with a message.

use lab::{matrix, Arch};

/// The kernel matrix of `arch` (scenarios/matrix/<arch>.toml) on its
/// kernels other than the project's own build: fails on any failed
/// scenario (a kernel that reports other features than its entry says it
/// lacks included), and unless the KHO scenario is `n/a` on each of those
/// kernels, none of which carries the KHO series. The shared body of
/// tests/kernel_matrix.rs and tests/arm64_kernel_matrix.rs.
pub fn distribution_kernels_pass_what_they_can_run(arch: Arch) {
    let (failed, table) = matrix::run_built_in_others(arch).unwrap_or_else(|e| panic!("{e}"));
    assert!(failed.is_empty(), "failed: {failed:?}\n{table}");
    // The matrix comes last, after each kernel's own table.
    let kho = table
        .lines()
        .rev()
        .find(|l| l.starts_with("kho-poison-survives-kexec "))
        .unwrap_or_else(|| panic!("no KHO row\n{table}"));
    assert_eq!(kho.matches("n/a").count(), 2, "{kho}\n{table}");
}
